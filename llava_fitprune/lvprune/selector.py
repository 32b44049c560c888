"""LVPruning at inference: the modules' keep logits pick the tokens, removed by indexing.

The schedule is a `Recipe` (the modules' keep fractions as token counts, `LVPruneConfig.recipe`),
so each module layer drops exactly its count: the lowest keep logits among the visual tokens still
alive (hard top-k). The modules live in the selector, never inside the model.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.recipe import Recipe
from ..core.methods import MethodContext, register_method
from ..core.selectors import TokenSelector, register_selector
from .modules import LVPruneModules


def as_modules(modules: "LVPruneModules | str") -> LVPruneModules:
    return modules if isinstance(modules, LVPruneModules) else LVPruneModules.load(modules)


def prompt_text(valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The modules' keys and values in a prefill: every real token that is not visual. [B, N] bool."""
    return valid & ~visual


class LVPruneSelector(TokenSelector):
    name = "lvprune"
    needs_attention = False

    def __init__(self, modules: "LVPruneModules | str"):
        self.modules = as_modules(modules)

    def importance(self, layer_idx, attention, state, hidden):
        module = self.modules.at(layer_idx)
        logits = module(hidden, state.visual, prompt_text(state.valid, state.visual))  # [B, N]
        return logits.masked_fill(~state.visual, float("inf"))


def model_num_visual_tokens(model) -> int:
    """Visual tokens per image of a LLaVA model (the vision tower's patch count)."""
    tower = model.get_vision_tower()
    if tower is None or not hasattr(tower, "num_patches"):
        raise ValueError("the model has no vision tower with `num_patches`: give num_visual_tokens")
    return int(tower.num_patches)


def attach(model, modules: "LVPruneModules | str", num_visual_tokens: Optional[int] = None) -> Recipe:
    """Prune `model` with LVPruning from now on; returns the schedule. The model's weights are untouched."""
    modules = as_modules(modules)
    layers = len(model.get_model().layers)
    if modules.config.num_layers != layers or modules.config.hidden_size != model.config.hidden_size:
        raise ValueError(f"LVPruning modules for {modules.config.num_layers} layers / hidden "
                         f"{modules.config.hidden_size} do not fit this model ({layers} / {model.config.hidden_size})")
    modules.to(model.device).eval()
    recipe = modules.config.recipe(num_visual_tokens or model_num_visual_tokens(model))
    model.set_pruning(recipe, LVPruneSelector(modules))
    return recipe


def build_lvprune(ctx: MethodContext, modules=None):
    """`core.methods.build_method("lvprune", modules=...)`: the modules' schedule and their selector."""
    if modules is None:
        raise ValueError("lvprune needs modules= (trained LVPruning modules or their folder)")
    if ctx.recipe is not None or ctx.reduction_ratio is not None:
        raise ValueError("LVPruning's schedule is set by its trained modules (their keep fractions), "
                         "not by a recipe or reduction_ratio")
    modules = as_modules(modules)
    recipe = modules.config.recipe(ctx.n_visual())
    if ctx.num_layers is not None:
        recipe.check_model(ctx.num_layers)
    return ctx.finish(recipe, {}, modules.config), LVPruneSelector(modules)


register_method("lvprune", build_lvprune)  # the core reaches LVPruning through its registry only
register_selector(LVPruneSelector)


def detach(model) -> None:
    """Back to the dense model (the modules are simply dropped from the selector)."""
    model.set_pruning(None)
