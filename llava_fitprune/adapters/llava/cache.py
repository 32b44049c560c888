"""A KV cache whose layers have their own lengths after pruning.

`transformers.DynamicCache` already keeps one tensor per layer, so per-layer lengths need nothing
new; what pruning adds is a per-layer *key mask* (which cached positions are real tokens rather
than padding), needed as soon as a batch is padded. `seen_tokens` stays the unpruned length
(layer 0 caches every token), which is what `generate` uses for position ids.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicCache

from ...core.key_masks import KeyMasks


class PrunedCache(KeyMasks, DynamicCache):
    def __init__(self) -> None:
        super().__init__()
        self.init_key_masks()
        self.padded = False  # whether any key mask has a False entry

    @classmethod
    def from_any(cls, past) -> "PrunedCache":
        """Accept our cache, a DynamicCache or a legacy tuple (then every cached key is taken as real)."""
        if past is None:
            return cls()
        if isinstance(past, cls):
            return past
        cache = cls()
        for layer_idx, (k, v) in enumerate(past):
            cache.update(k, v, layer_idx)
            cache.key_masks.append(torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=k.device))
        cache.seen_tokens = getattr(past, "seen_tokens", cache.seen_tokens)
        return cache

    def prepare_prefill(self, layer_lengths: list[int], like: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
        """Called once before a prefill's layer loop with the tokens each layer will cache
        (`layer_lengths[l]`, known from the plan) and `like` ([B, N, D] hidden states: batch, dtype,
        device). Nothing to do here: this cache grows as layers write; a static cache allocates."""

    def layer_lengths(self) -> list[int]:
        return [k.shape[-2] for k in self.key_cache]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_cache + self.value_cache)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.reorder_key_masks(beam_idx)

    def get_usable_length(self, new_seq_length: int, layer_idx: Optional[int] = 0) -> int:
        return self.get_seq_length(layer_idx)


def check_attention_mask(attention_mask: Optional[torch.Tensor], past_len: int, new_len: int) -> None:
    """transformers' rule: a 2-D mask covers the cached tokens and the new ones. [B, past_len + new_len]."""
    if attention_mask is not None and attention_mask.shape[-1] != past_len + new_len:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but the cache holds {past_len} tokens and "
            f"{new_len} are new: give a mask of {past_len + new_len} columns (the cached tokens' mask, "
            f"cache.key_masks[0], then the new tokens'), or no mask")


def continuation_mask(past, attention_mask: Optional[torch.Tensor], new_ids: torch.Tensor) -> torch.Tensor:
    """The mask for `generate(new_ids, past_key_values=past)`: [B, seen + N_new].

    Without a mask, the cached tokens' padding comes from the cache (layer 0 keeps every token it saw)
    and every new token is real; a given mask must have that length and agree with the cache's padding.
    """
    cache = PrunedCache.from_any(past)
    B, new_len = new_ids.shape
    past_mask = cache.key_masks[0] if cache.key_masks else new_ids.new_ones(B, 0, dtype=torch.bool)  # [B, seen]
    if attention_mask is None:
        return torch.cat([past_mask, past_mask.new_ones(B, new_len)], dim=-1).long()
    check_attention_mask(attention_mask, past_mask.shape[1], new_len)
    if not torch.equal(attention_mask[:, :past_mask.shape[1]].bool(), past_mask.to(attention_mask.device)):
        raise ValueError(
            "attention_mask's first columns differ from the padding of the cached tokens: start the mask "
            "with cache.key_masks[0] (or pass no mask when every new token is real)")
    return attention_mask
