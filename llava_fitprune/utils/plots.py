"""PNG plots of token schedules (matplotlib, headless)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from . import atomic

if TYPE_CHECKING:  # a type only: utils sits below the core
    from ..core.recipe import Recipe


def plot_schedules(recipes: Sequence[Recipe], path: str, title: str = "visual tokens per layer",
                   num_visual_tokens: int | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in recipes:
        alive = r.visual_tokens_entering(num_visual_tokens)[:-1]  # entering layer l, drawn over [l, l + 1)
        label = r.method if r.reduction_ratio is None else f"{r.method} {r.reduction_ratio:g}"
        if r.achieved_reduction is not None:
            label += f" (achieved {r.achieved_reduction:.3f}, {r.flops_convention})"
        ax.stairs(alive, range(len(alive) + 1), baseline=None, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens entering the layer")
    ax.set_title(title)
    return finish(fig, ax, path)


def finish(fig, ax, path: str) -> str:
    """Grid, legend, tight layout; save as PNG (atomically) and close. Returns path."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """`fig.savefig(path)` through a temporary file: a crash never leaves half a PNG."""
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
