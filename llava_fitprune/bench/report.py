"""Benchmark rows -> figures of merit, a Markdown table, a CSV and a latency-vs-TFLOPs plot."""
from __future__ import annotations

import csv
import math
import statistics
import textwrap
from collections import defaultdict

from ..utils import atomic

COLUMNS = [
    "attn", "batch", "method", "ratio", "visual_tokens", "avg_tokens_per_layer",
    "prefill_tflops", "flops_reduction", "prefill_ms", "speedup", "speedup_vs_stock", "speedup_vs_dense_fast",
    "efficiency", "time_vs_oracle",
    "prefill_cpu_ms", "cpu_time_vs_oracle",
    "decode_ms_per_token", "decode_cpu_ms_per_token", "decode_gflops_per_token", "decode_speedup",
    "decode_flops_ratio",
    "e2e_short_ms", "short_new_tokens", "e2e_ms", "compile_s", "compile_graphs", "cold_e2e_ms", "peak_mem_mb", "kv_bytes",
    "kv_bytes_predicted", "kv_fraction", "kv_fraction_predicted",
    "new_tokens", "repeats", "load_avg", "prefill_ms_runs",
]

# (header, column, format) of the printed table
TABLE = [
    ("attn", "attn", "{}"), ("B", "batch", "{}"), ("method", "method", "{}"), ("ratio", "ratio", "{:g}"),
    ("visual in", "visual_tokens", "{}"), ("avg tok/layer", "avg_tokens_per_layer", "{:.1f}"),
    ("TFLOPs", "prefill_tflops", "{:.3f}"), ("FLOPs red.", "flops_reduction", "{:.3f}"),
    ("prefill ms", "prefill_ms", "{:.1f}"), ("speedup", "speedup", "{:.2f}"),
    ("vs stock", "speedup_vs_stock", "{:.2f}"), ("vs dense-fast", "speedup_vs_dense_fast", "{:.2f}"),
    ("efficiency", "efficiency", "{:.2f}"), ("vs oracle", "time_vs_oracle", "{:.3f}"),
    ("CPU-time vs oracle", "cpu_time_vs_oracle", "{:.3f}"), ("prefill CPU ms", "prefill_cpu_ms", "{:.0f}"),
    ("decode ms/tok", "decode_ms_per_token", "{:.1f}"), ("dec. CPU ms/tok", "decode_cpu_ms_per_token", "{:.1f}"),
    ("dec. speedup", "decode_speedup", "{:.2f}"),
    ("dec. FLOPs ratio", "decode_flops_ratio", "{:.2f}"), ("e2e short ms", "e2e_short_ms", "{:.0f}"),
    ("e2e ms", "e2e_ms", "{:.0f}"), ("compile s", "compile_s", "{:.1f}"),
    ("graphs", "compile_graphs", "{}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"), ("KV frac", "kv_fraction", "{:.3f}"),
    ("KV frac pred.", "kv_fraction_predicted", "{:.3f}"), ("load", "load_avg", "{:.2f}"),
]

_TITLE_CHARS_PER_PANEL = 70
_MARKERS = {"stock": "D", "dense": "s", "dense-fast": "P", "fitprune": "o", "fitprune-fast": "*", "oracle": "x",
            "oracle-fast": "+", "prellm": "^"}
_DENSE = ("stock", "dense", "dense-fast")  # rows with nothing pruned


def _paired_ratio(row: dict, ref: dict, runs: str = "prefill_runs", median: str = "prefill_ms") -> float:
    """Median over repeats of row/ref prefill time, runs paired by turn (same machine load);
    the ratio of medians where the runs are not at hand."""
    a, b = row.get(runs), ref.get(runs)
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return row[median] / ref[median]


def add_figures_of_merit(rows: list[dict]) -> None:
    """Fill speedup (against dense, stock LLaVA and the dense fast path), efficiency, time vs the
    oracle on the same path (paired by turn) and the ratios against dense, per (attn, batch)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["attn"], r["batch"])].append(r)
    for group in groups.values():
        by_method = {r["method"]: r for r in group if r["method"] in _DENSE}
        dense, stock, dense_fast = by_method.get("dense"), by_method.get("stock"), by_method.get("dense-fast")
        oracle = {(r["ratio"], r["method"]): r for r in group if r["method"].startswith("oracle")}
        for r in group:
            o = oracle.get((r["ratio"], "oracle-fast" if r["method"].endswith("-fast") else "oracle"))
            pruned = o is not None and r["method"] not in _DENSE
            r["time_vs_oracle"] = _paired_ratio(r, o) if pruned else math.nan
            r["cpu_time_vs_oracle"] = _paired_ratio(r, o, "prefill_cpu_runs", "prefill_cpu_ms") if pruned else math.nan
            r["speedup_vs_stock"] = _paired_ratio(stock, r) if stock else math.nan
            r["speedup_vs_dense_fast"] = _paired_ratio(dense_fast, r) if dense_fast else math.nan
            if dense is None:
                r.update(speedup=math.nan, efficiency=math.nan, decode_speedup=math.nan,
                         decode_flops_ratio=math.nan, kv_fraction=math.nan, kv_fraction_predicted=math.nan)
                continue
            r["speedup"] = _paired_ratio(dense, r)
            r["efficiency"] = r["speedup"] / (dense["prefill_tflops"] / r["prefill_tflops"])
            r["decode_speedup"] = dense["decode_ms_per_token"] / r["decode_ms_per_token"]
            r["decode_flops_ratio"] = dense["decode_gflops_per_token"] / r["decode_gflops_per_token"]
            r["kv_fraction"] = r["kv_bytes"] / dense["kv_bytes"]
            r["kv_fraction_predicted"] = r["kv_bytes_predicted"] / dense["kv_bytes_predicted"]


def _fmt(fmt: str, value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(f, r.get(c, math.nan)) for _, c, f in TABLE) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            runs = " ".join(f"{t * 1e3:.1f}" for t in r.get("prefill_runs", []))  # seconds -> ms, in turn order
            w.writerow({**{c: r.get(c, "") for c in COLUMNS}, "prefill_ms_runs": runs})


def plot_latency_vs_flops(rows: list[dict], path: str, title: str = "") -> None:
    """One panel per (attn, batch): prefill latency against prefill TFLOPs, a marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.plots import save_figure

    keys = sorted({(r["attn"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        group = [r for r in rows if (r["attn"], r["batch"]) == key]
        for method, marker in _MARKERS.items():
            pts = [r for r in group if r["method"] == method]
            if not pts:
                continue
            ax.scatter([r["prefill_tflops"] for r in pts], [r["prefill_ms"] for r in pts], marker=marker, label=method)
            for r in pts:
                if r["method"] == "fitprune":
                    ax.annotate(f"{r['ratio']:g}", (r["prefill_tflops"], r["prefill_ms"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        dense = next((r for r in group if r["method"] == "dense"), None)
        if dense is not None:  # time proportional to FLOPs through the dense point
            xs = [0, dense["prefill_tflops"]]
            ax.plot(xs, [0, dense["prefill_ms"]], "k:", lw=0.8, label="∝ FLOPs")
        ax.set_xlabel("prefill TFLOPs")
        ax.set_ylabel("prefill latency (ms)")
        ax.set_title(f"{key[0]}, batch {key[1]}")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, _TITLE_CHARS_PER_PANEL * len(keys)), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
