"""The pruning decoder loop for transformers 5.x text models (Llama: llava-hf, LLaVA-NeXT; Qwen2.5-VL's
text model), put on one model instance (`attach`), never on the class.

Without a recipe the stock `forward` runs. With one, this loop replaces the stock loop only: it builds
the rotary (cos, sin) rows once from the stock position ids (1-D or M-RoPE 3-D), and per layer a
causal mask with transformers' own `create_causal_mask` sized to that layer's cache (`layer_idx=`)
and that layer's key mask; a sliding-window layer's mask adds the window over the original positions
of its keys and queries (window.py). Layers that drop nothing run the stock decoder layer (any
registered attention implementation; sdpa or eager with sliding windows); a layer that drops tokens
runs `pruning_layer_forward`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from .cache import PrunedCache
from .layer_step import pruning_layer_forward
from .window import window_causal_mask
from ...core.prefill_plan import make_plan
from ...core.recipe import Recipe
from ...core.selectors import FitPruneSelector, OracleSelector, TokenSelector


@dataclass
class PruneTrace:
    """What the last prefill did, per sample: the schedule, and per pruning layer the dropped positions."""

    visual_entering: list[list[int]]  # [L + 1][B] visual tokens alive entering each layer
    real_entering: list[list[int]]  # [L + 1][B] real tokens entering each layer
    dropped_positions: list[Optional[torch.Tensor]] = field(default_factory=list)  # [L] of [B, N_l], -1 = kept
    final_positions: Optional[torch.Tensor] = None  # [B, N_L] original index of each output row
    final_valid: Optional[torch.Tensor] = None  # [B, N_L] bool


@dataclass
class PruningState:
    """Per-instance pruning settings of a text model, and the visual mask of the call in flight."""

    recipe: Optional[Recipe] = None
    selector: TokenSelector = field(default_factory=FitPruneSelector)
    pending_visual: Optional[torch.Tensor] = None  # [B, N] bool, set by the VLM's forward for one call
    windows: list[Optional[int]] = field(default_factory=list)  # [L] sliding window per layer, None: full
    last_trace: Optional[PruneTrace] = None
    compiled: Optional[object] = None  # fast_prefill.HFCompiledPrefill: prefills through compiled regions

    @property
    def active(self) -> bool:
        return self.recipe is not None or isinstance(self.selector, OracleSelector)


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t: [B, N, ...], index: [B, M] -> [B, M, ...]"""
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))


class PruningTextModelMixin:
    """Put before a 5.x text model class (`LlamaModel`, `Qwen2_5_VLTextModel`) on one instance."""

    fitprune: PruningState

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        if "past_key_values" in kwargs:  # the stock forward's deprecated name for `cache`
            cache = kwargs.pop("past_key_values") if cache is None else cache
        state = self.fitprune
        visual_mask, state.pending_visual = state.pending_visual, None
        compiled = state.compiled if self._fitprune_compiles(cache, kwargs) else None
        if not state.active and compiled is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise NotImplementedError("output_attentions / output_hidden_states are not recorded while pruning: "
                                      "call set_pruning(None) for them")
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError("pruning takes a 2-D attention_mask [batch, keys] (or None); got a prepared mask")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = PrunedCache.from_any(cache, self.config) if use_cache else None
        B, N = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = cache.get_seq_length() if cache is not None else 0  # layer 0 holds every token
        position_ids = self.fitprune_position_ids(position_ids, past, B, N, device)
        cos, sin = (t.expand(B, -1, -1) for t in self.rotary_emb(inputs_embeds, position_ids))  # [B, N, hd]
        valid = (attention_mask[:, -N:].bool() if attention_mask is not None
                 else torch.ones(B, N, dtype=torch.bool, device=device))  # [B, N] real tokens of this step

        prefill = cache is None or past == 0
        prune, plan = None, None
        if prefill and visual_mask is not None:  # the plan: one host read (counts for the trace too)
            visual = visual_mask.to(device).bool() & valid
            plan = make_plan(len(self.layers), state.recipe, state.selector, visual, valid,
                             torch.arange(N, device=device).expand(B, -1), keep_empty=True)
            if plan.steps:  # the selector's set-up
                prune = plan.initial_state(visual, valid, None)
                state.selector.prepare(prune, plan)
        padded = plan.padded if plan is not None else attention_mask is not None and not bool(valid.all())
        after_layer = self.fitprune_after_layer(kwargs)  # a family's per-layer additions (Qwen3-VL's DeepStack)
        trace = PruneTrace(plan.visual_entering, plan.real_entering) if plan is not None else None
        windows = state.windows or [None] * len(self.layers)
        row_pos = None  # sliding windows: [B, n] original position of each row
        if any(w is not None for w in windows):
            row_pos = (torch.arange(N, device=device) + past).expand(B, N)

        hidden_states = inputs_embeds
        if compiled is not None:  # the layers through compiled regions (fast_prefill.py; no window, no
            # per-layer additions: enable_fast_path refuses those families)
            hidden_states, valid = compiled.layers(self, hidden_states, cos, sin, valid, cache, padded, plan, prune,
                                                   state.selector, trace)
        else:
            mask_key, mask = None, None
            for layer_idx, layer in enumerate(self.layers):
                key_mask = cache.extend_key_mask(layer_idx, valid) if cache is not None else valid  # [B, K_l]
                window = windows[layer_idx]
                key_pos = None if window is None else (  # [B, K_l] original position of each key
                    cache.extend_key_positions(layer_idx, row_pos) if cache is not None else row_pos)
                if prune is not None and layer_idx in plan.steps:
                    hidden_states, index, record = pruning_layer_forward(
                        layer, layer_idx, hidden_states, (cos, sin), key_mask, padded, cache, prune, state.selector,
                        plan.steps[layer_idx], window=window, key_positions=key_pos)
                    valid = prune.valid
                    cos, sin = _gather_rows(cos, index), _gather_rows(sin, index)
                    row_pos = row_pos.gather(1, index) if row_pos is not None else None
                    trace.dropped_positions.append(record.positions())
                    if after_layer is not None:
                        hidden_states = after_layer(layer_idx, hidden_states, prune)
                    continue
                if trace is not None:
                    trace.dropped_positions.append(None)
                if mask_key is None or mask_key[0] is not key_mask or mask_key[1] != window or mask_key[2] is not key_pos:
                    mask_key = (key_mask, window, key_pos)  # rebuilt only when the keys or the window change
                    mask = (create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=key_mask,
                                               cache=cache, layer_idx=layer_idx) if window is None else
                            window_causal_mask(self.config, hidden_states, key_mask, key_pos, window))
                hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=(cos, sin),
                                      cache=cache, use_cache=use_cache, **kwargs)
                if after_layer is not None:
                    hidden_states = after_layer(layer_idx, hidden_states, prune)

        hidden_states = self.norm(hidden_states)
        if prefill:
            if prune is not None:
                trace.final_positions, trace.final_valid = prune.orig_pos, prune.valid
            state.last_trace = trace  # decode steps keep the prefill's trace
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    def fitprune_after_layer(self, kwargs: dict):
        """Pop this family's extra text-model inputs from `kwargs`; return the step applied to the
        hidden states after each layer, `step(layer_idx, hidden_states [B, N_l, D], prune) -> [B, N_l, D]`
        (`prune`: the PruneState whose `orig_pos` [B, N_l] names each row's original position; None while
        the rows are the original ones), or None. The generic text model has none."""
        return None

    def _fitprune_compiles(self, cache, kwargs) -> bool:
        """Whether this call runs the compiled prefill (fast_prefill.py): a prefill, not training, no
        attentions or hidden states recorded."""
        if self.fitprune.compiled is None or self.training or kwargs.get("output_attentions") or \
                kwargs.get("output_hidden_states"):
            return False
        return cache is None or cache.get_seq_length() == 0

    def fitprune_position_ids(self, position_ids, past: int, batch: int, length: int, device) -> torch.Tensor:
        """The position ids the stock forward would give the rotary embedding (1-D rope)."""
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).unsqueeze(0)
        return position_ids
