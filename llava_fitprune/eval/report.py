"""`llava-fitprune report [ROOT]`: every finished eval run under ROOT as the paper's table and a plot.

    llava-fitprune report playground/data/eval [--out playground/data/eval/report] [--basis-text-tokens N]
    llava-fitprune report ROOT --set-score RUN BENCH VALUE      (a server's or GPT-4's score, by hand)
    llava-fitprune report ROOT --import-score RUN BENCH FILE    (read from the grader's result file)

Finds the merged answers files (`*.meta.json` with `kind: merged, complete: true`) and their scores
(`<answers>.score.json`), shows a score only while it is of these answers (the score file records
their sha256) and of the question file they answer, and writes report.md (the paper's columns, one row
per run, TFLOPs on one basis per model, Avg and Δ vs dense), report.csv (one line per run and benchmark)
and report.png (score against prefill TFLOPs per benchmark). docs/report.md describes it all.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

from .benchmarks import BENCHMARKS, BY_KEY, LOCALLY_SCORED  # noqa: F401  (the table's columns, re-exported)
from .io import EvalInputError, atomic_open
from .report_plot import plot
from .report_runs import LOCAL_SCORE_FAILED, NO_LOCAL_SCORE, STALE, Run, find_runs, latest_per_cell  # noqa: F401
from .report_table import CSV_FIELDS, csv_rows, markdown, model_bases
from .score_import import check_importer, import_score, parse_value, set_score

PROG = "llava-fitprune report"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="playground/data/eval", help="folder searched for results")
    p.add_argument("--out", default=None, help="output folder (default: ROOT/report)")
    p.add_argument("--basis-text-tokens", type=int, default=None, metavar="N",
                   help="text tokens of the common prompt TFLOPs are computed at (default: per model, the mean "
                        "prompt length over its benchmarks)")
    p.add_argument("--set-score", nargs=3, action="append", default=[], metavar=("RUN", "BENCH", "VALUE"),
                   help="record a score (percent; MME: perception points) for RUN's BENCH answers; repeatable")
    p.add_argument("--import-score", nargs=3, action="append", default=[], metavar=("RUN", "BENCH", "FILE"),
                   help="read RUN's BENCH score from the grader's result file (formats: docs/report.md); repeatable")
    return p


def find_answers(runs: list[Run], run: str, bench: str) -> Run:
    """The merged answers that RUN (a run name, or an answers file) has for BENCH."""
    if bench not in BY_KEY:
        raise EvalInputError(f"unknown benchmark {bench!r}: choose from {', '.join(BY_KEY)}")
    named = [r for r in runs if r.run_name == run or os.path.abspath(r.answers_file) == os.path.abspath(run)]
    if not named:
        known = sorted({r.run_name for r in runs})
        raise EvalInputError(f"unknown run {run!r}: the finished runs here are {', '.join(known) or 'none'}")
    mine = [r for r in named if r.benchmark == bench]
    if not mine:
        has = sorted({r.benchmark for r in named})
        raise EvalInputError(f"run {run!r} has no finished {bench} answers (it has {', '.join(has)}): run "
                             f"scripts/v1_5/eval/{bench}.sh first")
    rows = latest_per_cell(mine)
    if len(rows) > 1:
        files = [cells[bench].answers_file for cells in rows.values()]
        raise EvalInputError(f"run {run!r} has {len(files)} {bench} runs with other settings ({', '.join(files)}): "
                             f"give the answers file as RUN")
    return next(iter(rows.values()))[bench]


def record_scores(root: str, sets: list, imports: list) -> list[str]:
    """Every score checked first, then each written atomically; the lines to print."""
    runs, _ = find_runs(root)
    plans = []
    for run, bench, value in sets:
        target = find_answers(runs, run, bench)
        plans.append((target, bench, parse_value(bench, value), {"kind": "set-score"}, None, None))
    for run, bench, path in imports:
        check_importer(bench)
        target = find_answers(runs, run, bench)
        score, details, coverage = import_score(bench, path, target.answers_file)
        plans.append((target, bench, score, {"kind": "import", "file": os.path.abspath(path)}, details, coverage))
    lines = []
    for target, bench, score, source, details, coverage in plans:
        set_score(bench, score, target.answers_file, source, details, coverage)
        lines.append(f"{target.run_name} {bench}: {BY_KEY[bench].metric} {score:g} -> {target.answers_file}.score.json")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"{PROG}: error: {args.root} is not a folder", file=sys.stderr)
        return 2
    if args.basis_text_tokens is not None and args.basis_text_tokens < 0:
        p.error(f"--basis-text-tokens {args.basis_text_tokens}: a token count is >= 0")
    if args.set_score or args.import_score:
        try:
            lines = record_scores(args.root, args.set_score, args.import_score)
        except EvalInputError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        print("\n".join(lines) + f"\nrun `{PROG} {args.root}` to see the table")
        return 0
    runs, notes = find_runs(args.root)
    if not runs:
        print(f"report: no finished runs under {args.root} (run scripts/v1_5/eval/*.sh first)", file=sys.stderr)
        for n in notes:
            print(f"  {n}", file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.root, "report")
    os.makedirs(out, exist_ok=True)
    table = latest_per_cell(runs, notes)
    notes += [r.note for cells in table.values() for r in cells.values() if r.note]
    bases = model_bases(runs, args.basis_text_tokens)
    text = markdown(table, notes, bases, args.basis_text_tokens is not None)
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write(text)
    with atomic_open(os.path.join(out, "report.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(runs, bases))
    plotted = plot([r for cells in table.values() for r in cells.values()], os.path.join(out, "report.png"),
                   BENCHMARKS)
    print(text)
    print(f"wrote {out}/report.md, report.csv" + (", report.png" if plotted else " (no local scores to plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
