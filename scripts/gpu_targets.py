"""The targets table of scripts/gpu_check.sh (issue #25 item 5): each target beside the measured figure.

Reads what the check's steps wrote (a step that was skipped or failed leaves its file missing: its
lines read "not measured"):
  --b1    the bench CSV at batch 1 (stock, dense, dense-fast, fitprune, fitprune-fast, oracle, oracle-fast)
  --b8    the bench CSV at batch 8 (the same rows)
  --eval  scripts/eval_row.py's JSON (TextVQA-shaped batch-1 run, 3 new tokens)
  --hf    scripts/hf_rows.py's CSV (the transformers backend: no target, its figures printed below)
Every line of TARGETS is printed, always: PASS, FAIL or "not measured". With --smoke (a CPU run at a
tiny shape) the statuses say "smoke: not a GPU figure". Writes the table to --out (Markdown) too.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass

RATIO = 0.6  # the recipe the targets are stated for (FitPrune 0.6)


@dataclass(frozen=True)
class Target:
    name: str  # what is measured
    source: str  # "b1" | "b8" | "eval"
    method: str  # the bench row (CSV "method"), or the eval JSON key
    column: str  # CSV column / JSON key
    op: str  # ">=" or "<="
    bound: float
    unit: str  # "x" or " ms"


TARGETS = (
    Target("batch-1 prefill, fitprune-fast 0.6 vs stock LLaVA", "b1", "fitprune-fast", "speedup_vs_stock",
           ">=", 1.8, "x"),
    Target("batch-1 prefill, fitprune-fast 0.6 vs dense-fast", "b1", "fitprune-fast", "speedup_vs_dense_fast",
           ">=", 1.5, "x"),
    Target("batch-1 decode per token, fitprune-fast 0.6", "b1", "fitprune-fast", "decode_ms_per_token",
           "<=", 12.0, " ms"),
    Target("batch-1 decode per token, dense-fast", "b1", "dense-fast", "decode_ms_per_token", "<=", 12.0, " ms"),
    Target("batch-8 prefill, fitprune-fast vs oracle-fast", "b8", "fitprune-fast", "time_vs_oracle",
           "<=", 1.10, "x"),
    Target("batch-8 prefill, fitprune (eager) vs oracle (eager)", "b8", "fitprune", "time_vs_oracle",
           "<=", 1.10, "x"),
    Target("eval row: 5,000 TextVQA-shaped questions, fitprune-fast vs stock, compile included", "eval",
           "fitprune-fast", "projected_speedup", ">=", 2.5, "x"),
)


def read_csv_rows(path: str | None) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: str | None) -> dict:
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def csv_value(rows: list[dict], method: str, column: str) -> float:
    """`column` of the row of `method` at RATIO (dense rows have ratio 0); NaN when absent."""
    for r in rows:
        if r.get("method") == method and (method.startswith(("dense", "stock")) or
                                          math.isclose(_number(r.get("ratio")), RATIO)):
            return _number(r.get(column))
    return math.nan


def figure(t: Target, b1: list[dict], b8: list[dict], ev: dict) -> float:
    if t.source == "eval":
        return _number(ev.get(t.column)) if ev else math.nan
    return csv_value(b1 if t.source == "b1" else b8, t.method, t.column)


def status(t: Target, value: float, smoke: bool) -> str:
    if math.isnan(value):
        return "not measured"
    ok = value >= t.bound if t.op == ">=" else value <= t.bound
    return ("PASS" if ok else "FAIL") + (" (smoke: not a GPU figure)" if smoke else "")


def table(b1: list[dict], b8: list[dict], ev: dict, smoke: bool, device: str, hf: tuple = ()) -> str:
    lines = [f"Targets (issue #25 item 5; LLaVA-1.5-7B shape; {device})", "",
             "| figure | target | measured | status |", "|---|---|---|---|"]
    for t in TARGETS:
        v = figure(t, b1, b8, ev)
        shown = "-" if math.isnan(v) else f"{v:.2f}{t.unit}"
        lines.append(f"| {t.name} | {t.op} {t.bound:g}{t.unit} | {shown} | {status(t, v, smoke)} |")
    lines.append("")
    if ev:  # the eval row's own figures, beside its target line
        rows = ev.get("rows", {})
        for name in ("stock", "fitprune-fast"):
            r = rows.get(name)
            if r:
                lines.append(f"eval row {name}: {r['steady_s_per_question'] * 1e3:.1f} ms/question steady; "
                             f"{ev.get('project')} questions projected {r['projected_s'] / 60:.2f} min "
                             f"(first question {r['first_question_s']:.2f} s, compile included; inductor cache "
                             f"{ev.get('inductor_cache', '?')})")
    for r in hf:
        lines.append(f"hf llava-1.5 {r['method']} B={r['batch']}: prefill {_number(r['prefill_ms']):.1f} ms "
                     f"({_number(r['speedup']):.2f}x dense), decode {_number(r['decode_ms_per_token']):.1f} ms/token, "
                     f"e2e {r['short_new_tokens']}: {_number(r['e2e_short_ms']):.0f} ms, {r['new_tokens']}: "
                     f"{_number(r['e2e_ms']):.0f} ms; visual tokens kept {r.get('visual_tokens_kept') or 'all'}; "
                     f"compile {_number(r.get('compile_s')):.1f} s")
    lines.append(f"hf fast path: {hf[0]['hf_fast_path']}" if hf else "hf rows: not measured")
    compile_s = sum(_number(r.get("compile_s")) for r in b1 + b8 if not math.isnan(_number(r.get("compile_s"))))
    lines.append(f"compile s, all bench rows (batch 1 and 8): {compile_s:.1f}")
    if smoke:
        lines.append("smoke: not a GPU figure (a CPU run at a tiny shape: the statuses check the wiring only)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b1")
    p.add_argument("--b8")
    p.add_argument("--eval")
    p.add_argument("--hf")
    p.add_argument("--device", default="GPU")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="Markdown file to write the table to")
    a = p.parse_args(argv)
    text = table(read_csv_rows(a.b1), read_csv_rows(a.b8), read_json(a.eval), a.smoke, a.device, read_csv_rows(a.hf))
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
