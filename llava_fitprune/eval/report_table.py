"""The report's table: report.md (the paper's columns, one row per run) and report.csv (one line per
run and benchmark).

TFLOPs sit on one basis per model: each row's pruning schedule applied to one common prompt (the
model's visual tokens and one text length), so rows compare whatever benchmarks each one ran.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..core.flops import LMShape, prefill_report
from ..core.recipe import Recipe, RecipeError
from .benchmarks import BENCHMARKS, percent_of_max
from .report_runs import OK, Run

TERA = 1e12
HALF = 0.5


@dataclass(frozen=True)
class Basis:
    shape: LMShape
    visual_tokens: int
    text_tokens: int


@dataclass(frozen=True)
class RowFlops:
    tflops: float
    reduction: float  # of the total prefill FLOPs
    visual_reduction: float  # the paper's visual-only convention


def model_bases(runs: list[Run], text_tokens: int | None = None) -> dict[str, Basis]:
    """Per model: its visual tokens per image (the most common among its runs) and a text length (`text_tokens`,
    else the mean over its benchmarks of their mean prompt length, each benchmark counted once)."""
    bases = {}
    for model in sorted({r.model for r in runs}):
        mine = [r for r in runs if r.model == model and r.meta.get("lm_shape") and r.prefill("text_tokens_mean")
                is not None and r.prefill("visual_tokens_entering_mean")]
        if not mine:
            continue
        visual = Counter(int(r.prefill("visual_tokens_entering_mean")[0] + HALF) for r in mine).most_common(1)[0][0]
        per_bench: dict = {}
        for r in mine:
            per_bench.setdefault(r.benchmark, []).append(r.prefill("text_tokens_mean"))
        means = [sum(v) / len(v) for v in per_bench.values()]
        text = text_tokens if text_tokens is not None else int(sum(means) / len(means) + HALF)
        bases[model] = Basis(LMShape(**mine[0].meta["lm_shape"]), visual, text)
    return bases


def row_flops(cells: dict, basis: Basis | None) -> RowFlops | None:
    """The row's recipe (all its cells share one: the fingerprint is in the row key) at the basis prompt."""
    if basis is None:
        return None
    recipe = next(iter(cells.values())).meta.get("recipe")
    try:
        drops = Recipe.from_dict(recipe).drops_for(basis.visual_tokens) if recipe else None
        rep = prefill_report(basis.shape, basis.text_tokens, basis.visual_tokens, drops)
    except (RecipeError, ValueError):  # a recipe of another depth than the recorded model
        return None
    return RowFlops(rep.pruned_flops / TERA, rep.reduction, rep.visual_only_reduction)


def cell_text(run: Run | None) -> str:
    if run is None:
        return ""
    if run.status != OK:
        return run.status
    text = f"{run.shown_score:.1f}"
    if run.partial:
        cov = run.coverage
        text += f" ({cov['scored']}/{cov['total']} {cov['unit']})"
    return text


def averaged(run: Run | None) -> float | None:
    """A cell's score on the 0-100 scale when it counts in Avg and Δ: shown, and not partial."""
    if run is None or run.status != OK or run.partial:
        return None
    return percent_of_max(run.benchmark, run.shown_score)


def dense_row(key: tuple, table: dict) -> dict | None:
    """The same model's dense row, preferring the same settings."""
    dense = [(k, cells) for k, cells in table.items() if k[1] == key[1] and k[2] == "dense"]
    same = [cells for k, cells in dense if k[5] == key[5]]
    return (same or [cells for _, cells in dense] or [None])[0]


def delta_vs_dense(key: tuple, cells: dict, table: dict) -> float | None:
    dense = dense_row(key, table)
    if key[2] == "dense" or dense is None:
        return None
    diffs = [averaged(cells.get(b)) - averaged(dense.get(b)) for b in cells
             if averaged(cells.get(b)) is not None and averaged(dense.get(b)) is not None]
    return sum(diffs) / len(diffs) if diffs else None


def method_text(key: tuple) -> str:
    _, _, method, budget, _, _ = key
    return method if method == "dense" else f"{method} ({budget})"


def chunks_text(cells: dict) -> str:
    counts = sorted({r.num_chunks for r in cells.values()})
    if counts == [1]:
        return ""
    return f", {counts[0]} chunks" if len(counts) == 1 else f", {counts[0]}-{counts[-1]} chunks"


def markdown(table: dict, notes: list[str], bases: dict[str, Basis], text_tokens_given: bool) -> str:
    names = [b for b, _ in BENCHMARKS]
    extra = sorted({b for cells in table.values() for b in cells} - set(names))
    columns = names + extra
    heads = [h for _, h in BENCHMARKS] + extra
    scored = {b for cells in table.values() for b in columns if averaged(cells.get(b)) is not None}
    flops = {key: row_flops(cells, bases.get(key[1])) for key, cells in table.items()}
    order = sorted(table, key=lambda k: (k[1], k[2] != "dense", -(flops[k].tflops if flops[k] else 0.0), k[0], k[5]))
    lines = ["| Run | Model | Method | Settings | TFLOPs | FLOPs − | Visual FLOPs − | " + " | ".join(heads)
             + " | Avg | Δ vs dense |", "|" + "---|" * (9 + len(heads))]
    for key in order:
        cells, f = table[key], flops[key]
        values = [averaged(cells.get(b)) for b in columns]
        values = [v for v in values if v is not None]
        avg = ""
        if values:
            avg = f"{sum(values) / len(values):.1f}" + (f" ({len(values)}/{len(scored)})" if len(values) < len(scored)
                                                         else "")
        delta = delta_vs_dense(key, cells, table)
        row = [key[0], key[1], method_text(key), key[5] + chunks_text(cells),
               f"{f.tflops:.3g}" if f else "", f"{f.reduction:.1%}" if f else "", f"{f.visual_reduction:.1%}" if f else ""]
        row += [cell_text(cells.get(b)) for b in columns]
        row += [avg, f"{delta:+.1f}" if delta is not None else ""]
        lines.append("| " + " | ".join(row) + " |")
    basis = "; ".join(f"{m}: {b.visual_tokens} visual + {b.text_tokens} text tokens" for m, b in bases.items())
    text_rule = "given by --basis-text-tokens" if text_tokens_given else "the mean prompt length over its benchmarks"
    lines += ["", "Scores: GQA, TextVQA accuracy; SQA-IMG accuracy on questions with an image; POPE F1 (mean of its "
              "three splits); MME perception score; SEED-IMG accuracy on image questions; VQAv2, VizWiz (test-dev), "
              "MMB, MMB-CN accuracy, LLaVA-W relative score and MM-Vet GPT-4 score as set or imported "
              "(`llava-fitprune report --set-score / --import-score`). "
              "`sub`: answers are ready to submit (VQAv2, VizWiz, MMBench servers) or to grade with GPT-4 (LLaVA-W, "
              "MM-Vet). `failed`: no score of these answers although the script scores them locally. `stale`: a "
              "score is there but of other answers or of an edited question file (see the notes). "
              "`(n/m unit)`: the score covers only n of the benchmark's m questions or tasks.",
              "Method: the method and what set its budget (the --reduction-ratio, the recipe's ratio or file, or the "
              "method's own options). Settings: conversation template, batch size, max_new_tokens where not the "
              "module's default, attention kernel, dtype, `compiled` for the fast path, chunks when more than one.",
              f"TFLOPs: language-model prefill FLOPs per sample (llava_fitprune.core.flops), each row's pruning "
              f"schedule applied to one common prompt per model ({basis}; text length {text_rule}). FLOPs −: the "
              f"total prefill FLOPs removed relative to the dense prefill of that prompt; Visual FLOPs −: the FitPrune "
              f"paper's convention, visual tokens only. Measured per-benchmark TFLOPs are in report.csv.",
              "Avg: mean of the row's scores on a 0-100 scale (MME as percent of its 2000 maximum), partial cells "
              "left out; `(k/n)`: k of the n benchmarks scored in this table. Δ vs dense: mean difference to the same "
              "model's dense row over the benchmarks both have, in the same points."]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["run", "model", "method", "budget", "recipe_fingerprint", "conv_mode", "batch_size", "max_new_tokens",
              "attn_implementation", "dtype", "compile", "num_chunks", "benchmark", "metric", "score", "status", "note",
              "coverage_scored", "coverage_total", "coverage_unit", "score_source", "num_answers", "dense_tflops",
              "pruned_tflops", "reduction", "visual_only_reduction", "basis_tflops", "basis_reduction",
              "basis_visual_reduction", "wall_time_s", "answers_sha256", "answers_file"]


def csv_rows(runs: list[Run], bases: dict[str, Basis]) -> list[dict]:
    out = []
    for r in runs:
        s, cov = r.score or {}, r.coverage or {}
        f = row_flops({r.benchmark: r}, bases.get(r.model))
        out.append({"run": r.run_name, "model": r.model, "method": r.method, "budget": r.budget,
                    "recipe_fingerprint": r.meta.get("recipe_fingerprint"), "conv_mode": r.meta.get("conv_mode"),
                    "batch_size": r.meta.get("batch_size"), "max_new_tokens": r.meta.get("max_new_tokens"),
                    "attn_implementation": r.meta.get("attn_implementation"), "dtype": r.meta.get("dtype"),
                    "compile": bool(r.meta.get("compile")), "num_chunks": r.num_chunks, "benchmark": r.benchmark,
                    "metric": s.get("metric"), "score": r.shown_score, "status": r.status, "note": r.note,
                    "coverage_scored": cov.get("scored"), "coverage_total": cov.get("total"),
                    "coverage_unit": cov.get("unit"), "score_source": (s.get("source") or {}).get("kind"),
                    "num_answers": r.meta.get("num_answers"), "dense_tflops": r.prefill("dense_tflops_mean"),
                    "pruned_tflops": r.prefill("pruned_tflops_mean"), "reduction": r.prefill("reduction"),
                    "visual_only_reduction": r.prefill("visual_only_reduction"),
                    "basis_tflops": f.tflops if f else None, "basis_reduction": f.reduction if f else None,
                    "basis_visual_reduction": f.visual_reduction if f else None,
                    "wall_time_s": r.meta.get("wall_time_s"), "answers_sha256": r.answers_sha256,
                    "answers_file": r.answers_file})
    return out
