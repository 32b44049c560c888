"""transformers 5.x `DynamicCache` whose layers carry a key mask after pruning.

Per-layer lengths are native to 5.x caches (one `DynamicLayer` per decoder layer). What pruning adds
is, per layer, which cached positions are real tokens rather than padding (`key_masks`), needed
as soon as a batch is padded or samples drop different counts, and for sliding-window layers
(`window.WindowLayer`) the original position of each cached key (`key_positions`), which their
masks read. Layer 0 keeps every token (dropped tokens stay in the layer that dropped them), so
`get_seq_length()` stays the unpruned length that `generate` and Qwen2.5-VL's rope deltas use for
the next positions.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .window import WindowLayer

from ...core.key_masks import KeyMasks


class PrunedCache(KeyMasks, DynamicCache):
    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        self.layers = [WindowLayer.adopt(layer) if type(layer) is DynamicSlidingWindowLayer else layer
                       for layer in self.layers]
        self.init_key_masks()
        self.key_positions: dict[int, torch.Tensor] = {}  # sliding layers: [B, K_l] long, original index

    @classmethod
    def from_any(cls, cache, config) -> "PrunedCache":
        """Ours as is; None: a new one; another DynamicCache: a new one over the same keys (its cached
        keys are taken as real tokens; a sliding layer's are the last ones of the sequence)."""
        if isinstance(cache, cls):
            return cache
        out = cls(config=config)
        if cache is None:
            return out
        if type(cache) is not DynamicCache or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                                                  for layer in cache.layers):
            raise ValueError(f"pruning needs a DynamicCache of full or sliding attention layers, got "
                             f"{type(cache).__name__}: pass cache=None (or a DynamicCache)")
        out.layers = [WindowLayer.adopt(layer) if type(layer) is DynamicSlidingWindowLayer else layer
                      for layer in cache.layers]
        for idx, layer in enumerate(out.layers):
            if layer.is_initialized and layer.keys.numel():
                held = layer.keys.shape[-2]
                out.key_masks.append(torch.ones(layer.keys.shape[0], held, dtype=torch.bool, device=layer.keys.device))
                if isinstance(layer, WindowLayer):
                    first = layer.get_seq_length() - held
                    out.key_positions[idx] = (torch.arange(held, device=layer.keys.device) + first).expand(
                        layer.keys.shape[0], -1)
        return out

    def held_keys(self, layer_idx: int, stored: torch.Tensor) -> torch.Tensor:
        """`stored` [B, K] cut to the keys a sliding layer still holds (all of them elsewhere)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return stored[:, stored.shape[1] - layer.held():] if isinstance(layer, WindowLayer) else stored

    def extend_key_positions(self, layer_idx: int, new_positions: torch.Tensor) -> torch.Tensor:
        """Sliding layers: append the original positions [B, Q] of the keys this step adds; return the
        positions of every key the layer attends to [B, K_l]."""
        old = self.key_positions.get(layer_idx)
        self.key_positions[layer_idx] = (new_positions if old is None else
                                         torch.cat([self.held_keys(layer_idx, old), new_positions], dim=-1))
        return self.key_positions[layer_idx]

    def layer_lengths(self) -> list[int]:
        return [self.get_seq_length(l) for l in range(len(self.layers))]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.reorder_key_masks(beam_idx)
        self.key_positions = {l: p.index_select(0, beam_idx.to(p.device)) for l, p in self.key_positions.items()}
