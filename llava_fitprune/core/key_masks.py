"""Per-layer key masks of a pruned KV cache, shared by both backends' caches.

After pruning, each decoder layer caches its own number of tokens, and in a padded batch (or when
samples drop different counts) some cached slots are padding. A key mask per layer says which cached
positions are real tokens: `key_masks[l]` is [B, K_l] bool, True = real. Each backend's cache
(`adapters/llava/cache.py` on transformers 4.37, `adapters/hf/cache.py` on 5.x) mixes this in and keeps
only what its transformers version needs.
"""
from __future__ import annotations

import torch


class KeyMasks:
    """Mixin: `self.key_masks` is set up by `init_key_masks()` in the cache's `__init__`."""

    key_masks: list[torch.Tensor]

    def init_key_masks(self) -> None:
        self.key_masks = []  # per layer: [B, K_l] bool, True = real token

    def held_keys(self, layer_idx: int, stored: torch.Tensor) -> torch.Tensor:
        """`stored` [B, K]: what of a layer's per-key record its cache still holds. Every key here; a cache
        whose layers drop old keys (a sliding window) cuts the record to match."""
        return stored

    def extend_key_mask(self, layer_idx: int, new_mask: torch.Tensor) -> torch.Tensor:
        """Append `new_mask` [B, Q] to layer `layer_idx`'s key mask; return the whole mask [B, K_l]."""
        if len(self.key_masks) <= layer_idx:
            self.key_masks.append(new_mask)
        else:
            self.key_masks[layer_idx] = torch.cat([self.held_keys(layer_idx, self.key_masks[layer_idx]), new_mask],
                                                  dim=-1)
        return self.key_masks[layer_idx]

    def reorder_key_masks(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the key masks follow the cache's rows."""
        self.key_masks = [m.index_select(0, beam_idx.to(m.device)) for m in self.key_masks]
