"""Per-answer prefill bookkeeping and its summary (mean TFLOPs, tokens entering each layer).

Each answer carries `metadata.prefill = {text_tokens, visual_tokens, visual_entering, measured}`,
so the summary can be recomputed from an answers file alone: after a resumed run, and when chunks
are merged. `visual_entering` has one entry per decoder layer plus the final count; it is read from
the model's prefill trace when the model exposes one (`measured: true`), else derived from the recipe.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from ..core.flops import LMShape, prefill_report

TERA = 1e12


def sample_prefill(text_tokens: int, visual_tokens: int, visual_entering: Sequence[int], measured: bool) -> dict:
    return {"text_tokens": int(text_tokens), "visual_tokens": int(visual_tokens),
            "visual_entering": [int(v) for v in visual_entering], "measured": bool(measured)}


def planned_visual_entering(recipe, num_layers: int, visual_tokens: int) -> list[int]:
    """What the recipe says (no recipe: nothing dropped)."""
    if recipe is None:
        return [int(visual_tokens)] * (num_layers + 1)
    return recipe.visual_tokens_entering(visual_tokens)


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _column_means(rows: Sequence[Sequence[int]]) -> Optional[list[float]]:
    if not rows:
        return None
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("answers disagree on the number of layers in metadata.prefill.visual_entering")
    return [sum(r[i] for r in rows) / len(rows) for i in range(width)]


def summarize(answers: Iterable[dict], shape: LMShape) -> dict:
    """Mean prefill TFLOPs (dense and pruned) per sample and mean tokens entering each layer."""
    dense, pruned, text, visual, seq, measured = [], [], [], [], [], []
    visual_macs = [0, 0]  # dense, pruned: the paper's visual-only convention
    for a in answers:
        p = (a.get("metadata") or {}).get("prefill")
        if not p:
            continue
        ve = p["visual_entering"]
        drops = [ve[i] - ve[i + 1] for i in range(len(ve) - 1)]
        rep = prefill_report(shape, p["text_tokens"], p["visual_tokens"], drops)
        dense.append(rep.dense_flops / TERA)
        pruned.append(rep.pruned_flops / TERA)
        visual_macs[0] += rep.dense_visual_macs
        visual_macs[1] += rep.pruned_visual_macs
        text.append(p["text_tokens"])
        visual.append(ve)
        seq.append(rep.schedule)
        measured.append(bool(p.get("measured")))
    total_dense, total_pruned = sum(dense), sum(pruned)
    return {
        "samples": len(dense),
        "dense_tflops_mean": _mean(dense),
        "pruned_tflops_mean": _mean(pruned),
        "reduction": (1.0 - total_pruned / total_dense) if total_dense else None,
        "visual_only_reduction": (1.0 - visual_macs[1] / visual_macs[0]) if visual_macs[0] else None,
        "text_tokens_mean": _mean(text),
        "visual_tokens_entering_mean": _column_means(visual),
        "seq_len_entering_mean": _column_means(seq),
        "measured_fraction": _mean([float(m) for m in measured]),
    }
