"""The demo on the shipped synthetic-task checkpoint: held-out questions with gold answers, recipes fitted
on the task's own training scenes, and live accuracy of each budget (`llava-fitprune demo`)."""
from __future__ import annotations

import os
import tempfile

import torch

from ..core.flops import reference_text_tokens
from .accuracy import data_seed, fitted_recipes, layer0_inputs, run_combo, split_questions, text_tokens
from .questions import QUESTION_TYPES


def task_recipes(model, tok, proc, checkpoint: str, ratios: list[float], conv_mode: str, num_samples: int = 16):
    """FitPrune recipes (visual-only convention), one per ratio, fitted on `num_samples` questions of freshly
    generated training scenes of the checkpoint's data seed (`accuracy.fitted_recipes`)."""
    seed, _ = data_seed(checkpoint)
    n_visual = model.get_vision_tower().num_patches
    with tempfile.TemporaryDirectory() as tmp:
        fitted, _ = fitted_recipes(model, tok, proc, ratios, seed, n_visual, data_root=tmp, num_samples=num_samples,
                                   conv_mode=conv_mode, convention="visual_only")
    unreachable = {r: why for r, why in fitted.items() if isinstance(why, str)}
    if unreachable:
        raise SystemExit(f"cannot fit these ratios on this model: {unreachable}")
    return [fitted[r] for r in ratios]


@torch.inference_mode()
def accuracy_table(model, tok, proc, split: str, configs: list[tuple[str, object]], configure, limit: int,
                   conv_mode: str) -> str:
    """Markdown: exact-match accuracy per question type for each (label, recipe) on the split's first
    `limit` questions; `configure(recipe, num_text_tokens)` sets the model's pruning for a row, with the
    reference prompt's text length for methods matched to equal FLOPs (as `llava-fitprune accuracy`)."""
    questions, gold = split_questions(split, limit)
    inputs = layer0_inputs(model, tok, proc, questions, os.path.join(split, "images"), conv_mode)
    n_text = reference_text_tokens(text_tokens(inputs))
    max_new = 1 + max(len(tok(gold[q["question_id"]], add_special_tokens=False).input_ids) for q in questions)
    types = [t for t in QUESTION_TYPES if any(q.get("category") == t for q in questions)]
    lines = ["| run | " + " | ".join(types) + " | overall |", "|---" * (len(types) + 2) + "|"]
    for label, recipe in configs:
        configure(recipe, n_text)
        counts, _ = run_combo(model, tok, inputs, questions, gold, 8, max_new, label)
        cells = [f"{100 * counts[t][0] / counts[t][1]:.0f}" if t in counts else "-" for t in types + ["overall"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    configure(None, n_text)
    return "\n".join(lines)
