"""`llava-fitprune report [ROOT]`: every finished eval run under ROOT as the paper's table and a plot.

    llava-fitprune report playground/data/eval [--out playground/data/eval/report]

Finds the merged answers files (`*.meta.json` with `kind: merged, complete: true`), reads their
scores (`<answers>.score.json`, written by the local evaluators the scripts run) and writes
report.md (benchmark columns, one row per distinct run: run name (CKPT), model, method, budget,
conversation template, batch size, max_new_tokens; with prefill TFLOPs), report.csv (one line per
run and benchmark) and report.png (score against TFLOPs per benchmark).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

from .args import LOADER_MAX_NEW_TOKENS, LONG_MAX_NEW_TOKENS
from .io import atomic_open, read_json, score_path
from .report_plot import plot

# Column order and headings of the paper's table (LLaVA-1.5's benchmarks).
BENCHMARKS = [("vqav2", "VQAv2"), ("gqa", "GQA"), ("vizwiz", "VizWiz"), ("sqa", "SQA-IMG"),
              ("textvqa", "TextVQA"), ("pope", "POPE"), ("mme", "MME"), ("mmbench", "MMB"),
              ("mmbench_cn", "MMB-CN"), ("seed", "SEED-IMG"), ("llavabench", "LLaVA-W"), ("mmvet", "MM-Vet")]
NO_LOCAL_SCORE = "sub"  # answers are ready for the benchmark's server or GPT grader
LOCAL_SCORE_FAILED = "failed"  # the script scores it locally, but no score is there
LOCALLY_SCORED = {"gqa", "sqa", "textvqa", "pope", "mme", "seed"}
# Each eval module's own max_new_tokens default (args.py): one script run mixes them, so they are one run.
DEFAULT_MAX_NEW_TOKENS = {"model_vqa_loader": LOADER_MAX_NEW_TOKENS, "model_vqa": LONG_MAX_NEW_TOKENS,
                          "model_vqa_science": LONG_MAX_NEW_TOKENS, "model_vqa_mmbench": LONG_MAX_NEW_TOKENS}
CSV_FIELDS = ["run", "model", "method", "budget", "recipe_fingerprint", "conv_mode", "batch_size", "max_new_tokens",
              "benchmark", "metric", "score", "num_answers", "dense_tflops", "pruned_tflops", "reduction",
              "wall_time_s", "attn_implementation", "dtype", "answers_file"]


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
    def run_name(self) -> str:
        """The scripts' CKPT: recorded by the merge, else read off LLaVA's layout (<CKPT>.jsonl, <CKPT>/merge.jsonl)."""
        if self.meta.get("run_name"):
            return self.meta["run_name"]
        stem = os.path.splitext(os.path.basename(self.answers_file))[0]
        return os.path.basename(os.path.dirname(self.answers_file)) if stem == "merge" else stem

    @property
    def budget(self) -> str:
        """What set the amount pruned: the --reduction-ratio flag, the recipe file, the method's own options."""
        recipe = self.meta.get("recipe")
        if not recipe:
            return "0"
        if self.meta.get("reduction_ratio") is not None:
            return f"{self.meta['reduction_ratio']:g}"
        if recipe.get("reduction_ratio") is not None:  # a FitPrune recipe made for a ratio
            return f"{recipe['reduction_ratio']:g}"
        if self.meta.get("recipe_file"):
            return os.path.basename(self.meta["recipe_file"])
        provenance = recipe.get("provenance") or {}
        if "fastv_k" in provenance:
            return f"K={provenance['fastv_k']} R={provenance['fastv_r']:g}"
        return str(self.meta.get("recipe_fingerprint"))

    @property
    def max_new_tokens(self):
        """None where the module's own default ran (modules differ: 128 for short answers, 1024 else)."""
        value = self.meta.get("max_new_tokens")
        return None if value == DEFAULT_MAX_NEW_TOKENS.get(self.meta.get("module")) else value

    @property
    def settings(self) -> str:
        text = f"{self.meta.get('conv_mode')}, batch {self.meta.get('batch_size')}"
        return text + (f", max_new_tokens {self.max_new_tokens}" if self.max_new_tokens is not None else "")

    @property
    def row_key(self) -> tuple:
        return (self.run_name, self.meta.get("model_name", "?"), self.method, self.budget,
                self.meta.get("recipe_fingerprint"), self.settings)

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


def latest_per_cell(runs: list[Run], notes: list[str] | None = None) -> dict:
    """{row_key: {benchmark: run}}, one row per distinct run; should one run have two merged files for
    a benchmark (e.g. moved folders), the later merge is shown and `notes` says so."""
    table: dict = {}
    for run in sorted(runs, key=lambda r: r.meta.get("merged_at", "")):
        cells = table.setdefault(run.row_key, {})
        if run.benchmark in cells and notes is not None:
            notes.append(f"{run.run_name} {run.benchmark}: {cells[run.benchmark].answers_file} is superseded by "
                         f"the later {run.answers_file}")
        cells[run.benchmark] = run
    return table


def row_tflops(cells: dict) -> tuple[float | None, float | None]:
    pruned = [r.prefill("pruned_tflops_mean") for r in cells.values() if r.prefill("pruned_tflops_mean") is not None]
    reduction = [r.prefill("reduction") for r in cells.values() if r.prefill("reduction") is not None]
    return (sum(pruned) / len(pruned) if pruned else None, sum(reduction) / len(reduction) if reduction else None)


def cell_text(run: Run | None) -> str:
    if run is None:
        return ""
    if run.score is None or run.score.get("score") is None:
        return LOCAL_SCORE_FAILED if run.benchmark in LOCALLY_SCORED else NO_LOCAL_SCORE
    return f"{run.score['score']:.1f}"


def _row_order(item) -> tuple:
    (run_name, model, method, _, _, settings), cells = item
    return (model, method != "dense", -(row_tflops(cells)[0] or 0.0), run_name, settings)


def markdown(table: dict, notes: list[str]) -> str:
    names = [b for b, _ in BENCHMARKS]
    extra = sorted({b for cells in table.values() for b in cells} - set(names))
    heads = [h for _, h in BENCHMARKS] + extra
    lines = ["| Run | Model | Method | Budget | Settings | TFLOPs | Reduction | " + " | ".join(heads) + " |",
             "|" + "---|" * (7 + len(heads))]
    for (run_name, model, method, budget, _, settings), cells in sorted(table.items(), key=_row_order):
        tflops, reduction = row_tflops(cells)
        vals = [cell_text(cells.get(b)) for b in names + extra]
        t = f"{tflops:.3g}" if tflops is not None else ""
        r = f"{reduction:.1%}" if reduction is not None else ""
        lines.append(f"| {run_name} | {model} | {method} | {budget} | {settings} | {t} | {r} | "
                     + " | ".join(vals) + " |")
    lines += ["", "Scores: GQA, TextVQA accuracy; SQA-IMG accuracy on questions with an image; POPE F1 (mean of "
              "its three splits); MME perception score; SEED-IMG accuracy on image questions. "
              f"`{NO_LOCAL_SCORE}`: answers are ready to submit (VQAv2, VizWiz, MMBench servers) or to grade with "
              "GPT-4 (LLaVA-W, MM-Vet). "
              f"`{LOCAL_SCORE_FAILED}`: the local scorer failed or did not run (see the script's output; rerun its "
              "score step). Budget: the --reduction-ratio, the recipe's ratio or file, or the method's own "
              "options. Settings: "
              "conversation template, batch size, and max_new_tokens where not the module's default.",
              "TFLOPs: language-model prefill per sample (llava_fitprune.core.flops), the mean over this row's "
              "benchmarks; Reduction: FLOPs removed relative to the dense prefill of the same inputs."]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def csv_rows(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        s = r.score or {}
        out.append({"run": r.run_name, "model": r.meta.get("model_name"), "method": r.method, "budget": r.budget,
                    "recipe_fingerprint": r.meta.get("recipe_fingerprint"), "conv_mode": r.meta.get("conv_mode"),
                    "max_new_tokens": r.meta.get("max_new_tokens"), "benchmark": r.benchmark,
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
    table = latest_per_cell(runs, notes)
    text = markdown(table, notes)
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write(text)
    with atomic_open(os.path.join(out, "report.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(runs))
    plotted = plot(runs, os.path.join(out, "report.png"), BENCHMARKS)
    print(text)
    print(f"wrote {out}/report.md, report.csv" + (", report.png" if plotted else " (no local scores to plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
