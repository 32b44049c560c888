"""The demo on the shipped synthetic-task checkpoint: held-out questions with gold answers, recipes fitted
on the task's own training scenes, and live accuracy of each budget (`llava-fitprune demo`)."""
from __future__ import annotations

import os
import tempfile

import torch

from .accuracy import data_seed, layer0_inputs, run_combo
from .evaluate import read_jsonl
from .questions import QUESTION_TYPES
from .scenes import SceneConfig, write_split


def split_questions(split: str, limit: int | None = None) -> tuple[list[dict], dict]:
    """(question rows, {question_id: gold answer}) of a test split written by write_split."""
    path = os.path.join(split, "questions.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the shipped split is eval_data/synth_llava/test, or make one "
                                f"with python -m llava_fitprune.synth.scenes")
    gold = {a["question_id"]: a["answer"] for a in read_jsonl(os.path.join(split, "answers.jsonl"))}
    return read_jsonl(path)[:limit], gold


def fitted_recipes(model, tok, proc, checkpoint: str, ratios: list[float], conv_mode: str, num_samples: int = 16):
    """FitPrune recipes (visual-only convention) fitted on `num_samples` questions of freshly generated
    training scenes of the checkpoint's data seed: the task's own distribution, never the test split."""
    from ..calibration import build_calibration
    from ..fit import fit

    seed, _ = data_seed(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        train = write_split(tmp, "train", num_samples, seed, SceneConfig(train_per_type=1))
        calib = build_calibration(model, tok, proc, os.path.join(train, "questions.jsonl"),
                                  os.path.join(train, "images"), conv_mode=conv_mode, num_samples=num_samples,
                                  seed=seed)
    return fit(model, calib, list(ratios), convention="visual_only")


@torch.inference_mode()
def accuracy_table(model, tok, proc, split: str, configs: list[tuple[str, object]], configure, limit: int,
                   conv_mode: str) -> str:
    """Markdown: exact-match accuracy per question type for each (label, recipe) on the split's first
    `limit` questions; `configure(recipe)` sets the model's pruning for a row."""
    questions, gold = split_questions(split, limit)
    inputs = layer0_inputs(model, tok, proc, questions, os.path.join(split, "images"), conv_mode)
    max_new = 1 + max(len(tok(gold[q["question_id"]], add_special_tokens=False).input_ids) for q in questions)
    types = [t for t in QUESTION_TYPES if any(q.get("category") == t for q in questions)]
    lines = ["| run | " + " | ".join(types) + " | overall |", "|---" * (len(types) + 2) + "|"]
    for label, recipe in configs:
        configure(recipe)
        counts, _ = run_combo(model, tok, inputs, questions, gold, 8, max_new, label)
        cells = [f"{100 * counts[t][0] / counts[t][1]:.0f}" if t in counts else "-" for t in types + ["overall"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    configure(None)
    return "\n".join(lines)
