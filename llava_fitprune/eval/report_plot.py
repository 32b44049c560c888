"""The report's plot: each locally scored benchmark's score against prefill TFLOPs, a line per method."""
from __future__ import annotations

import math

PANEL_INCHES = 4.0
MAX_COLUMNS = 3


def plot(runs, path: str, columns: list[tuple[str, str]]) -> bool:
    """Write the PNG; False (and no file) when no run has a local score. `columns`: the table's
    (benchmark, heading) pairs, in the order the panels follow."""
    scored = [r for r in runs if r.score and r.score.get("score") is not None
              and r.prefill("pruned_tflops_mean") is not None]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = dict(columns)
    benchmarks = sorted({r.benchmark for r in scored}, key=lambda b: list(heads).index(b) if b in heads else len(heads))
    cols = min(MAX_COLUMNS, len(benchmarks))
    rows = math.ceil(len(benchmarks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows), squeeze=False)
    for ax, bench in zip(axes.flat, benchmarks):
        series: dict = {}
        for r in scored:
            if r.benchmark == bench:
                model = r.meta.get("model_name", "?")
                # dense runs join every method's line, as its zero-reduction point
                series.setdefault((model, r.method), []).append(r)
        dense = {m: runs_ for (m, meth), runs_ in series.items() if meth == "dense"}
        for (model, method), points in sorted(series.items()):
            if method == "dense" and any(k[0] == model and k[1] != "dense" for k in series):
                continue
            points = points + (dense.get(model, []) if method != "dense" else [])
            points.sort(key=lambda r: r.prefill("pruned_tflops_mean"))
            xs = [r.prefill("pruned_tflops_mean") for r in points]
            ys = [r.score["score"] for r in points]
            ax.plot(xs, ys, marker="o", label=f"{model} {method}")
            for r, x, y in zip(points, xs, ys):
                label = "dense" if r.method == "dense" else r.budget
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        metric = next(r.score.get("metric") for r in scored if r.benchmark == bench)
        ax.set_title(heads.get(bench, bench))
        ax.set_xlabel("prefill TFLOPs / sample")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(benchmarks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
