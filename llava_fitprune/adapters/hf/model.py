"""Pruning control on one transformers VLM instance: `attach(model)` gives it `set_pruning`,
`fitprune_last` and a forward that hands the visual-token mask to its pruning text model.

Per instance: the instance's class becomes a subclass made here (`FitPrune<StockClass>`) of the
stock class; the stock classes and every other instance are untouched.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .decoder import PruneTrace, PruningState, PruningTextModelMixin
from .window import check_window_attention, layer_windows
from ...core.flops import LMShape, prefill_flops
from ...core.methods import build_method
from ...core.recipe import Recipe
from ...core.saved_method import refuse_unrestorable, selector_options
from ...core.selectors import FitPruneSelector, OracleSelector, TokenSelector

_SUBCLASSES: dict[tuple[type, type], type] = {}


def specialize(obj: torch.nn.Module, mixin: type) -> None:
    """Make `obj` an instance of a subclass (mixin, type(obj)), created once per pair."""
    base = type(obj)
    if issubclass(base, mixin):
        return
    key = (mixin, base)
    if key not in _SUBCLASSES:
        body = {"__module__": __name__}
        if hasattr(mixin, "forward"):  # generate() reads the forward's signature: show the stock one
            def forward(self, *args, **kwargs):
                return mixin.forward(self, *args, **kwargs)

            body["forward"] = functools.update_wrapper(forward, base.forward)
        _SUBCLASSES[key] = type(f"FitPrune{base.__name__}", (mixin, base), body)
    obj.__class__ = _SUBCLASSES[key]


@dataclass
class PrefillRecord:
    """What the last prefill did (`model.fitprune_last`), per sample b of the batch."""

    method: str
    recipe_fingerprint: Optional[str]  # None: dense
    visual_tokens: list[int]  # [B] visual tokens entering the language model
    visual_tokens_kept: list[int]  # [B] visual tokens alive after the last layer
    tokens_entering: list[list[int]]  # [B][L + 1] real tokens entering each layer (+ final)
    prefill_tflops: list[float]  # [B] language-model prefill TFLOPs (flops.py's model, LM head included)
    dense_prefill_tflops: list[float]  # [B] the same prompt unpruned

    def to_dict(self) -> dict:
        return asdict(self)


class FitPruneVLMMixin:
    """Put before a transformers `...ForConditionalGeneration` class on one instance (see `attach`)."""

    fitprune_visual_token_ids: tuple[int, ...] = ()
    fitprune_fit_refusal: Optional[str] = None  # why `fit` (core/fit_runner.py) cannot calibrate this family

    @property
    def fitprune_text_model(self):
        return self.model.language_model

    @property
    def fitprune_shape(self) -> LMShape:
        return LMShape.from_config(self.config.get_text_config(decoder=True))

    def set_pruning(self, recipe=None, *, reduction_ratio: Optional[float] = None, method: str = "fitprune",
                    selector: Optional[TokenSelector] = None, **method_options) -> Optional[Recipe]:
        """Prune with `recipe` (a Recipe or a path) or the built-in recipe for `reduction_ratio`, by
        `method` (core.methods.build_method: fitprune, fastv, uniform, random, lvprune, with their
        options); `set_pruning(None)` goes back to the stock model. `selector=` overrides the method's.
        Returns the schedule in use (None: dense)."""
        state: PruningState = self.fitprune_text_model.fitprune
        if recipe is None and reduction_ratio is None and method == "fitprune" and not method_options:
            schedule, chosen = None, FitPruneSelector()
        else:
            schedule, chosen = build_method(method, recipe=recipe, reduction_ratio=reduction_ratio,
                                            shape=self.fitprune_shape, **method_options)
        if schedule is not None:
            schedule.check_model(self.fitprune_shape.num_layers)
        windows = []
        if schedule is not None or isinstance(selector, OracleSelector):  # our loop runs: its masks must hold
            text_config = self.fitprune_text_model.config
            windows = layer_windows(text_config)
            check_window_attention(windows, text_config._attn_implementation)
        state.recipe, state.selector, state.windows = schedule, selector or chosen, windows
        state.last_trace = None
        return schedule

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`; the config also records the pruning (`fitprune_recipe`,
        `fitprune_method`, `fitprune_method_options`; None when dense), which `load_pretrained`
        restores. Refused when the selector cannot be restored (core/saved_method.py)."""
        state: PruningState = self.fitprune_text_model.fitprune
        recipe, method, options = None, None, None
        if state.recipe is not None:
            refuse_unrestorable(state.selector)
            recipe, method, options = state.recipe.to_dict(), state.selector.name, selector_options(state.selector)
        self.config.fitprune_recipe, self.config.fitprune_method, self.config.fitprune_method_options = \
            recipe, method, options
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def fitprune_recipe(self) -> Optional[Recipe]:
        return self.fitprune_text_model.fitprune.recipe

    @property
    def fitprune_compile_stats(self):
        """The compiled prefill's PrefillCompileStats (fast_prefill.py); None without the fast path."""
        compiled = self.fitprune_text_model.fitprune.compiled
        return None if compiled is None else compiled.stats

    @property
    def fitprune_trace(self) -> Optional[PruneTrace]:
        return self.fitprune_text_model.fitprune.last_trace

    @property
    def fitprune_last(self) -> Optional[PrefillRecord]:
        """Per-sample record of the last prefill with visual tokens (None before one, or when dense)."""
        trace = self.fitprune_trace
        state = self.fitprune_text_model.fitprune
        if trace is None:
            return None
        shape = self.fitprune_shape
        real = [list(col) for col in zip(*trace.real_entering)]  # [B][L + 1]
        tflops = [prefill_flops(shape, sched) / 1e12 for sched in real]
        dense = [prefill_flops(shape, [sched[0]] * len(sched)) / 1e12 for sched in real]
        return PrefillRecord(
            method=state.selector.name, recipe_fingerprint=state.recipe.fingerprint() if state.recipe else None,
            visual_tokens=list(trace.visual_entering[0]), visual_tokens_kept=list(trace.visual_entering[-1]),
            tokens_entering=real, prefill_tflops=tflops, dense_prefill_tflops=dense)

    def fitprune_visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, N] -> [B, N] bool, True at the visual-token placeholders."""
        ids = torch.tensor(self.fitprune_visual_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)

    def forward(self, *args, **kwargs):
        bound = inspect.signature(super().forward).bind_partial(*args, **kwargs).arguments
        input_ids = bound.get("input_ids")  # generate may pass the image features precomputed: read the ids
        state: PruningState = self.fitprune_text_model.fitprune
        state.pending_visual = self.fitprune_visual_mask(input_ids) if state.active and input_ids is not None else None
        try:
            return super().forward(*args, **kwargs)
        finally:
            state.pending_visual = None


def attach(model: torch.nn.Module, vlm_mixin: type, text_mixin: type = PruningTextModelMixin) -> torch.nn.Module:
    """Give `model` (and its text model) the pruning behaviour; dense until `set_pruning`."""
    specialize(model, vlm_mixin)
    text = model.fitprune_text_model
    specialize(text, text_mixin)
    text.fitprune = PruningState()
    return model
