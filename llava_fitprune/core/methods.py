"""Every pruning method as (schedule, token-selection rule): `build_method(method, ...)`.

    fitprune  FitPrune's recipe (built-in for `reduction_ratio`, or a fitted one) + FitPrune's scores.
    fastv     FastV: at FastV layer K (default 2) drop R (default 50%) of the visual tokens, ranked by
              the head-mean attention of the last prompt token in the layer before. FastV's K is the
              first layer without the tokens; drops here happen after a layer's attention, so the
              recipe drops at index K - 1 and ranks with that layer's own attention map.
    uniform   the same number of tokens dropped at every layer, until none are left: a rate of T / L
              tokens per layer as even as integer counts allow, C_l = min(n, floor((l+1) T / L)) tokens
              gone after layer l (T <= n spreads T over all layers; T = L n drops all at layer 0);
              tokens chosen by FitPrune's scores.
    random    FitPrune's schedule, tokens chosen at random (RandomSelector: a fixed positional hash).
    lvprune   the trained LVPruning modules' schedule (their keep fractions) and their decisions.

Budgets. For fastv and uniform, a `recipe` or `reduction_ratio` means "at equal FLOPs to that
FitPrune recipe" (the one `--method fitprune` would use with the same flags); `target_reduction=`
(a fraction of the dense prefill FLOPs) gives a budget directly. The rule is FitPrune's own for a
budget: the least aggressive integer schedule (fewest tokens dropped at FastV's layer; smallest
T for uniform) whose prefill FLOPs do not exceed the budget, so the baseline never spends
more than the reference, and by less than one more token's worth. FLOPs come from flops.py's
model ("total": every prefill token, for `num_text_tokens` text and `num_visual_tokens` visual
tokens; method_flops.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

from .flops import LMShape, resolve_shape
from .method_flops import least_meeting_budget, method_flops
from .recipe import Recipe, resolve_recipe
from .selectors import EXTERNAL_METHODS, FastVSelector, FitPruneSelector, RandomSelector, TokenSelector, UniformSelector

FASTV_K = 2  # FastV paper's default layer
FASTV_R = 0.5  # FastV paper's default fraction of visual tokens dropped
METHODS = ("fitprune", "fastv", "uniform", "random", "lvprune")


@dataclass
class MethodContext:
    recipe: Any
    reduction_ratio: Optional[float]
    shape: Optional[LMShape]
    model: Any
    num_text_tokens: Optional[int]
    num_visual_tokens: Optional[int]

    @property
    def num_layers(self) -> Optional[int]:
        if self.shape is not None:
            return self.shape.num_layers
        return len(self.model.get_model().layers) if self.model is not None else None

    @cached_property
    def reference(self) -> Optional[Recipe]:
        """The FitPrune recipe the flags select (None: neither a recipe nor a reduction ratio)."""
        return resolve_recipe(self.recipe, self.reduction_ratio, self.num_layers)

    def n_visual(self) -> int:
        if self.num_visual_tokens is not None:
            return int(self.num_visual_tokens)
        ref = self.reference
        if ref is not None:
            return ref.num_visual_tokens
        raise ValueError("give num_visual_tokens (or a recipe to take it from)")

    def need_shape(self, why: str) -> LMShape:
        if self.shape is None or self.num_text_tokens is None:
            raise ValueError(f"{why} needs the model's shape (shape= or model=) and num_text_tokens "
                             f"(prompt text tokens, e.g. the eval set's mean)")
        return self.shape

    def budget(self, target_reduction: Optional[float]) -> Optional[tuple[int, dict]]:
        """(FLOPs budget, provenance) or None when no budget was asked for."""
        ref = self.reference
        if ref is None and target_reduction is None:
            return None
        if ref is not None and target_reduction is not None:
            raise ValueError("give either a reference recipe / reduction_ratio or target_reduction, not both")
        shape = self.need_shape("an equal-FLOPs schedule")
        n_v = self.n_visual()
        if ref is not None:
            flops = method_flops(shape, ref, self.num_text_tokens, n_v).total
            return flops, {"matched_to": ref.fingerprint(), "matched_reduction_ratio": ref.reduction_ratio}
        dense = method_flops(shape, None, self.num_text_tokens, n_v).dense
        return math.floor((1 - float(target_reduction)) * dense), {"target_reduction": float(target_reduction)}

    def flops_of(self, drops: list[int], n_v: int) -> int:
        return method_flops(self.shape, Recipe(drops, n_v), self.num_text_tokens, n_v).total

    def finish(self, recipe: Recipe, provenance: dict, modules_config=None) -> Recipe:
        """Stamp the identity and the achieved FLOPs reduction (total convention, LVPruning's modules
        included) when the shape and text length are known."""
        achieved = None
        if self.shape is not None and self.num_text_tokens is not None:
            achieved = round(method_flops(self.shape, recipe, self.num_text_tokens, recipe.num_visual_tokens,
                                          modules_config).reduction, 6)
        name = {"name": self.model.name_or_path} if hasattr(self.model, "name_or_path") else {}
        model = {**name, **self.shape.to_dict()} if self.shape else {}
        return dataclasses.replace(recipe, achieved_reduction=achieved, flops_convention="total",
                                   model=model or recipe.model, provenance={**recipe.provenance, **provenance})


def fastv_drops(num_layers: int, k: int, dropped: int) -> list[int]:
    if not 1 <= k <= num_layers:
        raise ValueError(f"FastV layer K={k} must lie in [1, {num_layers}] (K=1 drops after layer 0's attention)")
    drops = [0] * num_layers
    drops[k - 1] = dropped
    return drops


def uniform_drops(num_layers: int, rate_total: int, num_visual_tokens: int) -> list[int]:
    """T = `rate_total` tokens per L layers, each layer the same (+-1) until the n visual tokens are gone."""
    gone = [min(num_visual_tokens, l * rate_total // num_layers) for l in range(num_layers + 1)]
    return [b - a for a, b in zip(gone, gone[1:])]


METHOD_OPTIONS = {"fitprune": (), "random": ("seed",), "fastv": ("k", "r", "target_reduction"),
                  "uniform": ("per_layer", "target_reduction"), "lvprune": ("modules",)}


def check_method(method: str, options: Optional[dict] = None) -> None:
    """The method name and its option names, checked before anything heavy runs."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown pruning method {method!r}; available: {list(METHODS)}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"method_options must be a dict of option names, got {type(options).__name__}")
    allowed = METHOD_OPTIONS[method]
    unknown = set(options or {}) - set(allowed)
    if unknown:
        raise TypeError(f"method {method!r} takes options {sorted(allowed)}, not {sorted(unknown)}")


def _fitprune(ctx: MethodContext):
    return ctx.reference, FitPruneSelector()


def _random(ctx: MethodContext, seed: int = 0):
    ref = ctx.reference
    if ref is None:
        raise ValueError("random uses FitPrune's schedule: give a recipe or a reduction_ratio")
    recipe = dataclasses.replace(ref, method="random", provenance={**ref.provenance, "schedule_of": ref.fingerprint(),
                                                                    "seed": int(seed)})
    return recipe, RandomSelector(seed)


def _fastv(ctx: MethodContext, k: int = FASTV_K, r: Optional[float] = None, target_reduction: Optional[float] = None):
    n_v, L = ctx.n_visual(), ctx.num_layers
    budget = ctx.budget(target_reduction)
    if budget is None:
        r = FASTV_R if r is None else float(r)
        if not 0 <= r <= 1:
            raise ValueError(f"FastV R={r} is a fraction of the visual tokens, in [0, 1]")
        dropped, prov = math.floor(r * n_v + 0.5), {"fastv_k": k, "fastv_r": r}
    else:
        if r is not None:
            raise ValueError("FastV at equal FLOPs chooses R itself: drop r= or the budget")
        flops, prov = budget
        try:
            dropped = least_meeting_budget(lambda d: ctx.flops_of(fastv_drops(L, k, d), n_v), flops, 0, n_v)
        except ValueError:
            raise ValueError(f"FastV at K={k} cannot meet the budget even dropping all {n_v} visual tokens: "
                             f"use a smaller K") from None
        prov = {**prov, "fastv_k": k, "fastv_r": dropped / n_v}
    recipe = Recipe(fastv_drops(L, k, dropped), n_v, method="fastv")
    return ctx.finish(recipe, prov), FastVSelector()


def _uniform(ctx: MethodContext, per_layer: Optional[float] = None, target_reduction: Optional[float] = None):
    n_v, L = ctx.n_visual(), ctx.num_layers
    budget = ctx.budget(target_reduction)
    if budget is None:
        if per_layer is None:
            raise ValueError("uniform needs a budget (recipe, reduction_ratio, target_reduction) or per_layer=")
        rate_total, prov = math.floor(float(per_layer) * L + 0.5), {}
    else:
        if per_layer is not None:
            raise ValueError("uniform at equal FLOPs chooses the rate itself: drop per_layer= or the budget")
        flops, prov = budget
        rate_total = least_meeting_budget(lambda t: ctx.flops_of(uniform_drops(L, t, n_v), n_v), flops, 0, L * n_v)
    prov = {**prov, "uniform_rate_total": rate_total, "uniform_per_layer": rate_total / L}
    recipe = Recipe(uniform_drops(L, rate_total, n_v), n_v, method="uniform")
    return ctx.finish(recipe, prov), UniformSelector()


_BUILDERS = {"fitprune": _fitprune, "fastv": _fastv, "uniform": _uniform, "random": _random}


def register_method(name: str, build) -> None:
    """Add a method defined above the core: `build(ctx: MethodContext, **options) -> (Recipe, TokenSelector)`.
    `llava_fitprune.lvprune` registers "lvprune" when it is imported (the core never imports it); the
    adapters import it, so `build_method("lvprune", ...)` works wherever a model is loaded."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not among the known methods {list(METHODS)}: add it to METHODS")
    _BUILDERS[name] = build


def build_method(method: str = "fitprune", *, recipe=None, reduction_ratio: Optional[float] = None, shape=None,
                 model=None, num_text_tokens: Optional[int] = None, num_visual_tokens: Optional[int] = None,
                 **options) -> tuple[Optional[Recipe], TokenSelector]:
    """The schedule (a Recipe with `method` set; None = dense) and the selector of `method`.

    shape: an LMShape / named shape / config (default: `model.config`). Options per method:
    fastv k, r, target_reduction; uniform per_layer, target_reduction; random seed; lvprune modules.
    """
    check_method(method, options)
    if shape is not None:
        shape = resolve_shape(shape)
    elif model is not None:
        shape = LMShape.from_config(model.config)
    ctx = MethodContext(recipe, reduction_ratio, shape, model, num_text_tokens, num_visual_tokens)
    if ctx.num_layers is None and method in ("fastv", "uniform"):
        raise ValueError(f"{method} needs the model's depth: give shape= or model=")
    if method not in _BUILDERS:
        raise ValueError(f"method {method!r} is defined in {EXTERNAL_METHODS[method]}, which registers it when "
                         f"imported: `import {EXTERNAL_METHODS[method]}` first")
    return _BUILDERS[method](ctx, **options)
