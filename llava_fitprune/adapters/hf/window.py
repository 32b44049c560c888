"""Sliding-window attention under pruning (Mistral; Qwen2-family layers past `max_window_layers`).

Which layers slide, and by how much, is read as transformers' own caches read it
(`get_layer_types_and_kwargs`: `layer_types`, else a `sliding_window` set in the config). Stock
transformers masks a sliding layer by sequence index: query i sees key j iff j <= i and
i - j < window. After pruning, a layer's keys are a subset of the sequence, so the window is applied
to the ORIGINAL sequence index of each key and query (`positions`), never to its row in the pruned
layer: a kept token sees exactly the kept keys stock attention would let it see. The causal part
stays transformers' (rows keep their order): the masks are made by transformers' own mask builders
(`sdpa_mask`, `eager_mask`) from `causal_mask_function` and-ed with the window over positions, an
index-based mask function (no vmap).

The cache of a sliding layer (`WindowLayer`) keeps the last `window - 1` keys, as transformers'
`DynamicSlidingWindowLayer` does. That is exact under pruning too: a key a future query can still see
has a position in (T - window, T), T being the next position; the rows after it in its layer have
larger distinct positions below T, so fewer than window - 1 of them, and it is among the last
window - 1 rows. The rows kept beyond those are masked by position.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function, eager_mask

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
WINDOW_ATTENTION = ("sdpa", "eager")  # attention implementations that take the position-window masks


def layer_windows(text_config) -> list[Optional[int]]:
    """Per decoder layer: its sliding window, or None (full attention). Raises for other layer types."""
    types, kwargs = get_layer_types_and_kwargs(text_config)
    other = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if other:
        raise NotImplementedError(f"pruning supports full and sliding-window attention layers; this model also has "
                                  f"{other}: use set_pruning(None) (stock) for it")
    return [kw.get("sliding_window") if t == "sliding_attention" else None for t, kw in zip(types, kwargs)]


def check_window_attention(windows: list[Optional[int]], attn_implementation: str) -> None:
    if any(w is not None for w in windows) and attn_implementation not in WINDOW_ATTENTION:
        raise ValueError(f"pruning a sliding-window model needs attn_implementation 'sdpa' or 'eager' "
                         f"(the window is applied over original positions), got {attn_implementation!r}")


def window_function(positions: torch.Tensor, window: int):
    """A transformers mask function (and-ed with causality): key kv is within `window` of query q by
    original position. positions: [B, K] long, the original index of each key of the layer (the
    queries are its last rows), indexed by the mask's q_idx / kv_idx (broadcast index tensors)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < window

    return inner


def window_causal_mask(config, hidden_states: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor,
                       window: int) -> torch.Tensor:
    """The mask a stock sliding layer takes (config._attn_implementation: sdpa -> bool, eager -> additive,
    [B, 1, n, K]) for the queries hidden_states [B, n, D], the last n of K keys at original
    `positions` [B, K] (key_mask: [B, K] bool, real keys)."""
    (B, n), K = hidden_states.shape[:2], key_mask.shape[1]
    return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
        batch_size=B, q_length=n, kv_length=K, q_offset=K - n, kv_offset=0, attention_mask=key_mask,
        mask_function=and_masks(causal_mask_function, window_function(positions, window)),
        allow_is_causal_skip=False, dtype=hidden_states.dtype, config=config, use_vmap=False,
        device=hidden_states.device)


def window_mask_additive(key_mask: torch.Tensor, positions: torch.Tensor, window: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, N, N] mask of a pruning layer (a prefill: queries = keys): causal, real keys,
    within `window` by original position. key_mask: [B, N] bool; positions: [B, N] long."""
    B, N = key_mask.shape
    return eager_mask(batch_size=B, q_length=N, kv_length=N, attention_mask=key_mask, dtype=dtype, use_vmap=False,
                      mask_function=and_masks(causal_mask_function, window_function(positions, window)),
                      device=key_mask.device)


class WindowLayer(DynamicLayer):
    """A sliding layer's cache under pruning: keeps the last `window - 1` keys after each update (as
    `DynamicSlidingWindowLayer`) and counts every key it was given (`get_seq_length`). Its masks are
    made over the keys it holds (PrunedCache keeps their key mask and positions alike)."""

    is_sliding = True
    is_croppable = False

    def __init__(self, sliding_window: int):
        super().__init__()
        self.sliding_window = sliding_window
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keep = min(self.sliding_window - 1, keys.shape[-2])
        self.keys, self.values = keys[:, :, keys.shape[-2] - keep:], values[:, :, values.shape[-2] - keep:]
        return keys, values

    def held(self) -> int:
        """Keys held (the last ones given)."""
        return self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pruned sliding-window cache cannot be cropped")

    @classmethod
    def adopt(cls, layer) -> "WindowLayer":
        """transformers' DynamicSlidingWindowLayer -> ours, holding the same keys."""
        out = cls(layer.sliding_window)
        if layer.is_initialized:
            out.lazy_initialization(layer.keys, layer.values)
            out.keys, out.values, out.cumulative_length = layer.keys, layer.values, layer.get_seq_length()
        return out
