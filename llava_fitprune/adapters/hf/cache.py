"""transformers 5.x `DynamicCache` whose layers carry a key mask after pruning.

Per-layer lengths are native to 5.x caches (one `DynamicLayer` per decoder layer). What pruning adds
is, per layer, which cached positions are real tokens rather than padding (`key_masks`), needed
as soon as a batch is padded or samples drop different counts. Layer 0 keeps every token (dropped
tokens stay in the layer that dropped them), so `get_seq_length()` stays the unpruned length that
`generate` and Qwen2.5-VL's rope deltas use for the next positions.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...core.key_masks import KeyMasks


class PrunedCache(KeyMasks, DynamicCache):
    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        self.init_key_masks()

    @classmethod
    def from_any(cls, cache, config) -> "PrunedCache":
        """Ours as is; None: a new one; another DynamicCache: a new one over the same layer objects
        (their cached keys are taken as real tokens)."""
        if isinstance(cache, cls):
            return cache
        out = cls(config=config)
        if cache is None:
            return out
        if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise ValueError(f"pruning needs a DynamicCache of full-attention layers, got {type(cache).__name__}: "
                             f"pass cache=None (or a DynamicCache)")
        out.layers = cache.layers
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                out.key_masks.append(torch.ones(layer.keys.shape[0], layer.keys.shape[-2], dtype=torch.bool,
                                                device=layer.keys.device))
        return out

    def layer_lengths(self) -> list[int]:
        return [self.get_seq_length(l) for l in range(len(self.layers))]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.reorder_key_masks(beam_idx)
