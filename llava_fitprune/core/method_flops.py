"""Prefill FLOPs of every pruning method from one FLOPs model (flops.py), and equal-FLOPs matching.

Every method's schedule is a `Recipe`, so its language-model FLOPs are `flops.prefill_report` of
the recipe's drops. LVPruning adds the cost of its own modules (below); the other methods' extra
work (scores, top-k) is left out, as flops.py leaves out norms and softmax.

LVPruning module at a layer with `v` visual tokens alive (queries) and `t` prompt text tokens
(keys and values), hidden size `h`, module width `w` (FLOPs = 2 x multiply-accumulates):
    q projection            2 * v * h * w
    k, v projections        2 * 2 * t * h * w
    QK^T and PV             2 * 2 * v * t * w
    o projection            2 * v * w * w
    score MLP               2 * v * (2 * w * w + w)      ([q, context] -> w -> 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .flops import LMShape, prefill_report
from .recipe import Recipe

SCORE_INPUT_WIDTHS = 2  # the score MLP reads [query, attended context]
TERA = 1e12


def lvprune_module_flops(hidden_size: int, width: int, num_visual: int, num_text: int) -> int:
    h, w, v, t = hidden_size, width, num_visual, num_text
    q = 2 * v * h * w
    kv = 2 * 2 * t * h * w
    attn = 2 * 2 * v * t * w
    o = 2 * v * w * w
    score = 2 * v * (SCORE_INPUT_WIDTHS * w * w + w)
    return q + kv + attn + o + score


def lvprune_modules_flops(modules_config, recipe: Recipe, num_text_tokens: int, num_visual_tokens: int) -> int:
    """All modules of one prefill. `modules_config` needs `layers`, `width`, `hidden_size` (an LVPruneConfig)."""
    alive = recipe.visual_tokens_entering(num_visual_tokens)  # [L + 1]
    return sum(lvprune_module_flops(modules_config.hidden_size, modules_config.width, alive[layer], num_text_tokens)
               for layer in modules_config.layers)


@dataclass
class MethodFlops:
    dense: int  # the unpruned prefill
    language_model: int  # the pruned prefill of the language model (flops.prefill_report)
    extra: int  # the method's own modules (LVPruning), 0 for the others
    schedule: list[int]  # tokens entering each layer, plus the final count

    @property
    def total(self) -> int:
        return self.language_model + self.extra

    @property
    def reduction(self) -> float:
        return 1.0 - self.total / self.dense


def method_flops(shape: LMShape, recipe: Optional[Recipe], num_text_tokens: int, num_visual_tokens: int,
                 modules_config=None, text_before_image: int = 0) -> MethodFlops:
    """Prefill FLOPs of a method's schedule (`recipe`, None = dense) plus LVPruning modules, if given.

    `text_before_image`: see `flops.prefill_flops` (0 counts every pruning layer's full attention
    square, the convention used for matching budgets)."""
    drops = recipe.drops_for(num_visual_tokens) if recipe is not None else None
    rep = prefill_report(shape, num_text_tokens, num_visual_tokens, drops, text_before_image=text_before_image)
    extra = 0
    if modules_config is not None and recipe is not None:
        extra = lvprune_modules_flops(modules_config, recipe, num_text_tokens, num_visual_tokens)
    return MethodFlops(rep.dense_flops, rep.pruned_flops, extra, rep.schedule)


def recipe_flops(shape: LMShape, recipe: Optional[Recipe], num_text_tokens: int, num_visual_tokens: int,
                 text_before_image: int = 0) -> int:
    return method_flops(shape, recipe, num_text_tokens, num_visual_tokens, None, text_before_image).total


def least_meeting_budget(flops_of: Callable[[int], int], budget: int, lo: int, hi: int) -> int:
    """The smallest integer x in [lo, hi] with flops_of(x) <= budget, for flops_of non-increasing in x.

    This is FitPrune's own rule for a budget (the least aggressive schedule that meets it): the
    result never spends more FLOPs than `budget`, and one step less aggressive would.
    """
    if flops_of(hi) > budget:
        raise ValueError(f"the most aggressive schedule ({hi}) still spends {flops_of(hi)} FLOPs > budget {budget}")
    while lo < hi:
        mid = (lo + hi) // 2
        if flops_of(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def flops_table(shape: LMShape, methods: Sequence[tuple[str, Optional[Recipe], object]], num_text_tokens: int,
                num_visual_tokens: int) -> list[dict]:
    """Rows (method, TFLOPs, reduction, extra) for `(name, recipe, modules_config or None)` entries."""
    rows = []
    for name, recipe, modules_config in methods:
        f = method_flops(shape, recipe, num_text_tokens, num_visual_tokens, modules_config)
        rows.append({"method": name, "tflops": f.total / TERA, "reduction": f.reduction,
                     "extra_tflops": f.extra / TERA, "dense_tflops": f.dense / TERA})
    return rows
