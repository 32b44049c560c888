"""PNG plots of token schedules (matplotlib, headless)."""
from __future__ import annotations

from typing import Sequence

from .recipe import Recipe


def plot_schedules(recipes: Sequence[Recipe], path: str, title: str = "visual tokens per layer",
                   num_visual_tokens: int | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in recipes:
        alive = r.visual_tokens_entering(num_visual_tokens)
        label = r.method if r.reduction_ratio is None else f"{r.method} {r.reduction_ratio:g}"
        ax.step(range(len(alive)), alive, where="post", label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens entering the layer")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
