"""The report's plot: each benchmark's shown score against its measured prefill TFLOPs, a line per method.

Legible with many methods: every line has its own colour, marker and line style (the same in every
panel), one legend sits outside the panels, and each point's budget label is placed where it overlaps
no other label (tried around the point, nearest first).
"""
from __future__ import annotations

import math

PANEL_INCHES = 4.0
MAX_COLUMNS = 3
DPI = 120
COLORS = "tab10"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":"]
DENSE_STYLE = dict(color="black", marker="*", markersize=11, linestyle="none")
LABEL_FONT = 7
LABEL_BOX = dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85)
MARKER_CLEARANCE = 4.0  # points around a marker's centre that labels avoid
# label offsets from its point, in typographic points, nearest first
OFFSETS = [(0, 9), (0, -15), (4, 4), (4, -10), (-4, 4), (-4, -10), (8, 12), (8, -18), (-8, 12), (-8, -18), (14, -3), (-14, -3),
           (4, 22), (4, -28), (-4, 22), (-4, -28)]


def series_name(run) -> str:
    return f"{run.model} {run.method}"


def style_for(index: int) -> dict:
    """Colour, marker and line style cycle with coprime-ish periods, so no two of the first 20 lines match."""
    import matplotlib

    colors = matplotlib.colormaps[COLORS].colors
    return dict(color=colors[index % len(colors)], marker=MARKERS[index % len(MARKERS)],
                linestyle=LINESTYLES[index % len(LINESTYLES)], markersize=6, linewidth=1.4)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def marker_boxes(ax, xys, renderer, radius_points: float) -> list:
    """Display-space boxes around the plotted points, so that labels keep off the markers."""
    from matplotlib.transforms import Bbox

    r = radius_points * renderer.points_to_pixels(1.0)
    out = []
    for x, y in ax.transData.transform(xys) if xys else []:
        out.append(Bbox([[x - r, y - r], [x + r, y + r]]))
    return out


def place_labels(ax, points: list[tuple[float, float, str]], renderer, obstacles: list) -> list:
    """Annotate each (x, y, text) at the first offset whose box overlaps no label placed so far and no
    marker (else at the least overlapping one)."""
    placed, texts = list(obstacles), []
    for x, y, text in points:
        best = None
        for dx, dy in OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=LABEL_FONT,
                              ha="center" if dx == 0 else ("left" if dx > 0 else "right"), bbox=LABEL_BOX)
            box = ann.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in placed)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])
        texts.append(best[1])
    return texts


def budget_labels(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One label per budget and TFLOPs (methods at one budget share a label), at its highest point."""
    top: dict = {}
    for x, y, text in points:
        key = (round(x, 6), text)
        if key not in top or y > top[key][1]:
            top[key] = (x, y, text)
    return sorted(top.values())


def draw(runs, columns: list[tuple[str, str]]):
    """The figure, or None when no run has a shown score and measured TFLOPs."""
    scored = [r for r in runs if r.shown_score is not None and r.prefill("pruned_tflops_mean") is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = dict(columns)
    order = list(heads)
    benchmarks = sorted({r.benchmark for r in scored}, key=lambda b: order.index(b) if b in order else len(order))
    names = sorted({series_name(r) for r in scored if r.method != "dense"})
    styles = {name: style_for(i) for i, name in enumerate(names)}
    cols = min(MAX_COLUMNS, len(benchmarks))
    rows = math.ceil(len(benchmarks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows), squeeze=False)
    handles, pending = {}, []
    for ax, bench in zip(axes.flat, benchmarks):
        mine = [r for r in scored if r.benchmark == bench]
        labels = []
        for name in names:
            model = name.split(" ")[0]
            points = [r for r in mine if series_name(r) == name]
            if not points:
                continue
            points += [r for r in mine if r.method == "dense" and r.model == model]  # its zero-reduction end
            points.sort(key=lambda r: r.prefill("pruned_tflops_mean"))
            xs = [r.prefill("pruned_tflops_mean") for r in points]
            ys = [r.shown_score for r in points]
            (line,) = ax.plot(xs, ys, label=name, **styles[name])
            handles.setdefault(name, line)
            labels += [(x, y, r.budget) for r, x, y in zip(points, xs, ys) if r.method != "dense"]
        for r in (r for r in mine if r.method == "dense"):
            (dot,) = ax.plot([r.prefill("pruned_tflops_mean")], [r.shown_score], label="dense", **DENSE_STYLE)
            handles.setdefault(f"{r.model} dense", dot)
        metric = next(r.score.get("metric") for r in mine)
        ax.set_title(heads.get(bench, bench))
        ax.set_xlabel("prefill TFLOPs / sample")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.margins(0.12)
        pending.append((ax, budget_labels(labels), [(x, y) for line in ax.lines for x, y in line.get_xydata()]))
    for ax in list(axes.flat)[len(benchmarks):]:
        ax.axis("off")
    fig.tight_layout()  # the panels' final places, before the labels are placed in display space
    renderer = fig.canvas.get_renderer()
    for ax, labels, xys in pending:
        place_labels(ax, labels, renderer, marker_boxes(ax, xys, renderer, MARKER_CLEARANCE))
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
               frameon=False, title="method (point label: budget)")
    return fig


def plot(runs, path: str, columns: list[tuple[str, str]]) -> bool:
    """Write the PNG; False (and no file) when no run has a shown score. `columns`: the table's
    (benchmark, heading) pairs, in the order the panels follow."""
    fig = draw(runs, columns)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    from .io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return True
