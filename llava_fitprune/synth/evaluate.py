"""Greedy generation as llava.eval.model_vqa_loader does it (batch 1, any device), exact-match scored."""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from tqdm import tqdm

DEFAULT_MAX_NEW_TOKENS = 8


def read_jsonl(path_or_rows) -> list[dict]:
    if not isinstance(path_or_rows, (str, os.PathLike)):
        return list(path_or_rows)
    with open(path_or_rows) as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def _model_inputs(model, tokenizer, image_processor, question: dict, image_folder: str, conv_mode: str):
    """model_vqa_loader's CustomDataset.__getitem__: prompt ids (1, T), image tensor (1, 3, H, W), size."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    qs = question["text"]
    if getattr(model.config, "mm_use_im_start_end", False):
        qs = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + qs
    else:
        qs = DEFAULT_IMAGE_TOKEN + "\n" + qs
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    path = os.path.join(image_folder, question["image"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} of question {question['question_id']!r} not found")
    image = Image.open(path).convert("RGB")
    image_tensor = process_images([image], image_processor, model.config)  # (1, 3, H, W)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    return input_ids, image_tensor, image.size


def evaluate(model, tokenizer, image_processor, questions, answers, image_folder: str,
             conv_mode: str = "vicuna_v1", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             limit: int | None = None, predictions_file: str | None = None, progress: bool = True) -> dict:
    """Exact-match accuracy per question category (and "overall") of greedy answers.

    `questions`/`answers`: model_vqa_loader question rows and {"question_id", "answer"} rows, or jsonl
    paths to them. Works with any LLaVA-style model whose `generate` takes images=/image_sizes=.
    Returns {category: {"correct", "total", "accuracy"}, ..., "overall": {...}}. `predictions_file`
    receives model_vqa_loader's answer lines plus "gold" and "correct".
    """
    questions = read_jsonl(questions)[:limit]
    gold = {a["question_id"]: a["answer"] for a in read_jsonl(answers)}
    missing = [q["question_id"] for q in questions if q["question_id"] not in gold]
    if missing:
        raise ValueError(f"{len(missing)} questions have no answer, e.g. {missing[:3]}")
    device = model.device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    counts = defaultdict(lambda: [0, 0])
    rows = []
    for q in tqdm(questions, desc="eval", disable=not progress):
        input_ids, image_tensor, size = _model_inputs(model, tokenizer, image_processor, q, image_folder, conv_mode)
        with torch.inference_mode():
            output_ids = model.generate(
                input_ids.to(device), images=image_tensor.to(dtype=dtype, device=device), image_sizes=[size],
                do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True)
        text = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
        ok = normalize(text) == normalize(gold[q["question_id"]])
        for key in (q.get("category", "all"), "overall"):
            counts[key][0] += ok
            counts[key][1] += 1
        rows.append({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                     "gold": gold[q["question_id"]], "correct": ok, "metadata": {}})
    if predictions_file:
        os.makedirs(os.path.dirname(os.path.abspath(predictions_file)), exist_ok=True)
        with open(predictions_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in sorted(counts.items())}


def evaluate_checkpoint(ckpt: str, split_dir: str, **kw) -> dict:
    """Load `ckpt` with LLaVA's class (fp32, CPU) and score it on split_dir's questions/answers."""
    from .model_io import load_llava

    tokenizer, model, image_processor = load_llava(ckpt)
    model.eval()
    return evaluate(model, tokenizer, image_processor, os.path.join(split_dir, "questions.jsonl"),
                    os.path.join(split_dir, "answers.jsonl"), os.path.join(split_dir, "images"), **kw)
