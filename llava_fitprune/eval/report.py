"""`llava-fitprune report [ROOT]`: every finished eval run under ROOT as the paper's table and a plot.

    llava-fitprune report playground/data/eval [--out playground/data/eval/report]

Finds the merged answers files (`*.meta.json` with `kind: merged, complete: true`), reads their
scores (`<answers>.score.json`, written by the local evaluators the scripts run) and writes
report.md (benchmark columns, one row per model / method / reduction ratio, with prefill TFLOPs),
report.csv (one line per run and benchmark) and report.png (score against TFLOPs per benchmark).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

from .io import read_json, score_path

# Column order and headings of the paper's table (LLaVA-1.5's benchmarks).
BENCHMARKS = [("vqav2", "VQAv2"), ("gqa", "GQA"), ("vizwiz", "VizWiz"), ("sqa", "SQA-IMG"),
              ("textvqa", "TextVQA"), ("pope", "POPE"), ("mme", "MME"), ("mmbench", "MMB"),
              ("mmbench_cn", "MMB-CN"), ("seed", "SEED-IMG"), ("llavabench", "LLaVA-W"), ("mmvet", "MM-Vet")]
NO_LOCAL_SCORE = "sub"  # answers are ready for the benchmark's server or GPT grader
CSV_FIELDS = ["model", "method", "ratio", "recipe_fingerprint", "benchmark", "metric", "score", "num_answers",
              "dense_tflops", "pruned_tflops", "reduction", "wall_time_s", "batch_size", "attn_implementation",
              "dtype", "answers_file"]


@dataclass
class Run:
    meta: dict
    answers_file: str
    score: dict | None

    @property
    def benchmark(self) -> str:
        return self.meta.get("benchmark") or "unknown"

    @property
    def method(self) -> str:
        return self.meta.get("method", "fitprune") if self.meta.get("recipe") else "dense"

    @property
    def ratio(self) -> str:
        recipe = self.meta.get("recipe")
        if not recipe:
            return "0"
        if recipe.get("reduction_ratio") is not None:
            return f"{recipe['reduction_ratio']:g}"
        return os.path.basename(self.meta.get("recipe_file") or "") or str(self.meta.get("recipe_fingerprint"))

    @property
    def row_key(self) -> tuple:
        return (self.meta.get("model_name", "?"), self.method, self.ratio, self.meta.get("recipe_fingerprint"))

    def prefill(self, key: str):
        return (self.meta.get("prefill") or {}).get(key)


def find_runs(root: str) -> tuple[list[Run], list[str]]:
    """Finished merged runs under `root`, and notes about what was skipped."""
    runs, notes = [], []
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".meta.json"):
                continue
            path = os.path.join(folder, name)
            try:
                meta = read_json(path, "eval sidecar")
            except ValueError as e:
                notes.append(f"skipped {path}: {e}")
                continue
            if meta.get("format") != "llava-fitprune.eval-meta" or meta.get("kind") != "merged":
                continue
            answers = path[: -len(".meta.json")]
            if not meta.get("complete"):
                notes.append(f"skipped {answers}: not complete (rerun its script)")
                continue
            spath = score_path(answers)
            runs.append(Run(meta, answers, read_json(spath, "score file") if os.path.exists(spath) else None))
    return runs, notes


def latest_per_cell(runs: list[Run]) -> dict:
    """{row_key: {benchmark: run}}; when a cell was run twice, the later merge wins."""
    table: dict = {}
    for run in sorted(runs, key=lambda r: r.meta.get("merged_at", "")):
        table.setdefault(run.row_key, {})[run.benchmark] = run
    return table


def row_tflops(cells: dict) -> tuple[float | None, float | None]:
    pruned = [r.prefill("pruned_tflops_mean") for r in cells.values() if r.prefill("pruned_tflops_mean") is not None]
    reduction = [r.prefill("reduction") for r in cells.values() if r.prefill("reduction") is not None]
    return (sum(pruned) / len(pruned) if pruned else None, sum(reduction) / len(reduction) if reduction else None)


def cell_text(run: Run | None) -> str:
    if run is None:
        return ""
    if run.score is None or run.score.get("score") is None:
        return NO_LOCAL_SCORE
    return f"{run.score['score']:.1f}"


def _row_order(item) -> tuple:
    (model, method, _, _), cells = item
    return (model, method != "dense", -(row_tflops(cells)[0] or 0.0))


def markdown(table: dict, notes: list[str]) -> str:
    names = [b for b, _ in BENCHMARKS]
    extra = sorted({b for cells in table.values() for b in cells} - set(names))
    heads = [h for _, h in BENCHMARKS] + extra
    lines = ["| Model | Method | Ratio | TFLOPs | Reduction | " + " | ".join(heads) + " |",
             "|" + "---|" * (5 + len(heads))]
    for (model, method, ratio, _), cells in sorted(table.items(), key=_row_order):
        tflops, reduction = row_tflops(cells)
        vals = [cell_text(cells.get(b)) for b in names + extra]
        t = f"{tflops:.3g}" if tflops is not None else ""
        r = f"{reduction:.1%}" if reduction is not None else ""
        lines.append(f"| {model} | {method} | {ratio} | {t} | {r} | " + " | ".join(vals) + " |")
    lines += ["", "Scores: GQA, TextVQA accuracy; SQA-IMG accuracy on questions with an image; POPE F1 (mean of "
              "its three splits); MME perception score; SEED-IMG accuracy on image questions. "
              f"`{NO_LOCAL_SCORE}`: answers are ready to submit (VQAv2, VizWiz, MMBench servers) or to grade with "
              "GPT-4 (LLaVA-W, MM-Vet).",
              "TFLOPs: language-model prefill per sample (llava_fitprune.core.flops), the mean over this row's "
              "benchmarks; Reduction: FLOPs removed relative to the dense prefill of the same inputs."]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def csv_rows(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        s = r.score or {}
        out.append({"model": r.meta.get("model_name"), "method": r.method, "ratio": r.ratio,
                    "recipe_fingerprint": r.meta.get("recipe_fingerprint"), "benchmark": r.benchmark,
                    "metric": s.get("metric"), "score": s.get("score"), "num_answers": r.meta.get("num_answers"),
                    "dense_tflops": r.prefill("dense_tflops_mean"), "pruned_tflops": r.prefill("pruned_tflops_mean"),
                    "reduction": r.prefill("reduction"), "wall_time_s": r.meta.get("wall_time_s"),
                    "batch_size": r.meta.get("batch_size"), "attn_implementation": r.meta.get("attn_implementation"),
                    "dtype": r.meta.get("dtype"), "answers_file": r.answers_file})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-fitprune report", description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="playground/data/eval", help="folder searched for results")
    p.add_argument("--out", default=None, help="output folder (default: ROOT/report)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"report: {args.root} is not a folder", file=sys.stderr)
        return 2
    runs, notes = find_runs(args.root)
    if not runs:
        print(f"report: no finished runs under {args.root} (run scripts/v1_5/eval/*.sh first)", file=sys.stderr)
        for n in notes:
            print(f"  {n}", file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.root, "report")
    os.makedirs(out, exist_ok=True)
    table = latest_per_cell(runs)
    text = markdown(table, notes)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(runs))
    from .report_plot import plot

    plotted = plot(runs, os.path.join(out, "report.png"))
    print(text)
    print(f"wrote {out}/report.md, report.csv" + (", report.png" if plotted else " (no local scores to plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
