"""Calibration samples for `fit`: LLaVA-format questions + images, turned into layer-0 inputs.

Prompts are built as `llava.eval.model_vqa_loader` builds them: `conv_templates[conv_mode]`,
`DEFAULT_IMAGE_TOKEN + '\\n' + question` (with the start/end tokens when the model uses them),
`tokenizer_image_token`, `process_images`. Each sample is then expanded by the model's own
`prepare_multimodal`, so its `inputs_embeds` are exactly what decoder layer 0 receives.

The sample types and the question file's reading and sampling are the core's (`core/calibration.py`).
"""
from __future__ import annotations

import hashlib
import os

import torch

from ...core.calibration import (CalibrationError, CalibrationSample, CalibrationSet, read_questions,
                                sample_questions, sha256_file)


def build_prompt(question: str, conv_mode: str, mm_use_im_start_end: bool) -> str:
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise CalibrationError(f"unknown conv mode {conv_mode!r}; LLaVA's templates: {sorted(conv_templates)}")
    if DEFAULT_IMAGE_TOKEN in question:
        raise CalibrationError(
            f"question text already holds {DEFAULT_IMAGE_TOKEN!r}: LLaVA's eval format has the bare question "
            f"(the image token is added here); strip it from the question file")
    image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end \
        else DEFAULT_IMAGE_TOKEN
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], image + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@torch.no_grad()
def prepare_sample(model, tokenizer, image_processor, question: dict, image_folder: str,
                   conv_mode: str) -> CalibrationSample:
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    from .modeling import text_after_last_image

    path = os.path.join(image_folder, question["image"])
    if not os.path.isfile(path):
        raise CalibrationError(
            f"image {path} of question_id {question['question_id']!r} does not exist: check --image-folder")
    image = Image.open(path).convert("RGB")
    prompt = build_prompt(question["text"], conv_mode, getattr(model.config, "mm_use_im_start_end", False))
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]  # [1, T]
    images = process_images([image], image_processor, model.config)
    images = images.to(device=model.device, dtype=model.dtype) if torch.is_tensor(images) else \
        [im.to(device=model.device, dtype=model.dtype) for im in images]
    out = model.prepare_multimodal(input_ids.to(model.device), None, None, None, None, images,
                                   image_sizes=[image.size])
    embeds, visual = out[4], out[6]  # [1, N, D], [1, N]
    if visual is None or not bool(visual.any()):
        raise CalibrationError(f"question_id {question['question_id']!r}: the model inserted no visual tokens")
    text = text_after_last_image(visual, torch.ones_like(visual))
    if not bool(text.any()):
        raise CalibrationError(
            f"question_id {question['question_id']!r}: no text after the image; FitPrune's cross score needs the "
            f"question and assistant prefix after it (check --conv-mode)")
    return CalibrationSample(question["question_id"], embeds, visual, text)


def build_calibration(model, tokenizer, image_processor, question_file: str, image_folder: str, *,
                      conv_mode: str = "vicuna_v1", num_samples: int = 66, seed: int = 0,
                      progress: bool = True) -> CalibrationSet:
    """Read, sample and prepare a calibration set (see the module doc for the exact sampling)."""
    from tqdm import tqdm

    if not os.path.isdir(image_folder):
        raise CalibrationError(f"image folder {image_folder} does not exist")
    questions = read_questions(question_file)
    picked = sample_questions(questions, num_samples, seed)
    samples, image_hash = [], hashlib.sha256()
    for q in tqdm(picked, desc="calibration: prepare samples", disable=not progress):
        samples.append(prepare_sample(model, tokenizer, image_processor, q, image_folder, conv_mode))
        image_hash.update(bytes.fromhex(sha256_file(os.path.join(image_folder, q["image"]))))
    meta = {
        "question_file": os.path.basename(question_file),
        "question_file_sha256": sha256_file(question_file),
        "images_sha256": image_hash.hexdigest(),  # over the sampled images' sha256s, in sample order
        "num_samples": len(samples),
        "seed": seed,
        "conv_mode": conv_mode,
        "sampling": "sorted(random.Random(seed).sample(range(num_questions), num_samples))",
        "num_questions": len(questions),
        "question_ids": [q["question_id"] for q in picked],
    }
    return CalibrationSet(samples, meta)
