"""`llava-fitprune fit` through the transformers-native backend (.venv-hf): a LLaVA-format question
file and image folder -> calibration samples asked with the processor's own chat template
(adapters/hf/calibration.py) -> `core.fit.fit` -> recipes of the model's own depth, which
`adapters.hf.load_pretrained(..., recipe=PATH)` and the lmms-eval plugin (`recipe=PATH`) take.
"""
from __future__ import annotations

import hashlib
import os
import time

import torch

from ..core.calibration import CalibrationSet, read_questions, sample_questions, sha256_file


def build_hf_calibration(model, processor, question_file: str, image_folder: str, *, num_samples: int, seed: int,
                         progress: bool = True) -> CalibrationSet:
    """The same sampling and provenance as the LLaVA backend's build_calibration, prompts from the processor."""
    from PIL import Image
    from tqdm import tqdm

    from ..adapters.hf.calibration import calibration_samples
    from ..core.calibration import CalibrationError

    questions = read_questions(question_file)
    picked = sample_questions(questions, num_samples, seed)
    samples, image_hash = [], hashlib.sha256()
    for q in tqdm(picked, desc="calibration: prepare samples", disable=not progress):
        path = os.path.join(image_folder, q["image"])
        if not os.path.isfile(path):
            raise CalibrationError(f"image {path} of question_id {q['question_id']!r} does not exist: check "
                                   f"--image-folder")
        image = Image.open(path).convert("RGB")
        samples += calibration_samples(model, processor, [(image, q["text"])], [q["question_id"]])
        image_hash.update(bytes.fromhex(sha256_file(path)))
    meta = {"question_file": os.path.basename(question_file), "question_file_sha256": sha256_file(question_file),
            "images_sha256": image_hash.hexdigest(), "num_samples": len(samples), "seed": seed,
            "prompt": "the processor's chat template (transformers backend)",
            "sampling": "sorted(random.Random(seed).sample(range(num_questions), num_samples))",
            "num_questions": len(questions), "question_ids": [q["question_id"] for q in picked]}
    return CalibrationSet(samples, meta)


def load_hf(args):
    """(model, processor) of --model-path on --device in --dtype (default float32 on CPU, float16 on CUDA)."""
    from ..adapters.hf import load_pretrained

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return load_pretrained(args.model_path, device=device, dtype=dtype, attn_implementation="sdpa")


def run_fit_hf(args, ratios, num_samples: int, report: dict):
    """(recipes, model name) for args (checked by fit.py)."""
    from ..core.fit import fit

    progress = not args.no_progress
    t0 = time.perf_counter()
    model, processor = load_hf(args)
    report["load_model_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    calib = build_hf_calibration(model, processor, args.question_file, args.image_folder, num_samples=num_samples,
                                 seed=args.seed, progress=progress)
    report["calibration_s"] = round(time.perf_counter() - t0, 3)
    name = args.model_name or os.path.basename(os.path.normpath(args.model_path))
    recipes = fit(model, calib, ratios, convention=args.flops_convention, tol=args.tol, progress=progress,
                  batch_size=args.batch_size, model_name=name, report=report,
                  max_pruning_layers=args.max_pruning_layers)
    return recipes, name
