"""A KV cache of fixed-size buffers, one per layer, sized at prefill: the decode fast path's cache.

Layer l's buffers hold its own (pruned) prefill length plus the tokens still to come, rounded up to
a bucket: [B, KV, capacity_l, hd] keys and values and a [B, capacity_l] key mask (True = a real
token; unfilled slots and padding are False). A decode step then has fixed shapes (it writes slot
`lengths[l]` of every layer and attends over the whole buffer under the mask), so it can be
compiled once and replayed as a CUDA graph; the pruned layers' buffers are shorter, so the smaller
cache is a real saving in memory and in bytes read per step.

The eager decoder loop (modeling.py) runs on this cache unchanged: `extend_key_mask` and `update`
append into the buffers (growing a layer's buffers when a call needs more room), and
`key_cache`/`value_cache`/`key_masks` are views of the filled slots.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cache import PrunedCache

DEFAULT_BUCKET = 64  # capacities are rounded up to this: nearby prompt lengths share buffer shapes


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


class ReleasedCacheError(RuntimeError):
    pass


class StaticPrunedCache(PrunedCache):
    """Per-layer fixed-size KV buffers; `extra_tokens` slots are reserved beyond each layer's prefill."""

    # DynamicCache.__init__ is not called: key_cache / value_cache are views (properties) here.
    def __init__(self, extra_tokens: int, bucket: int = DEFAULT_BUCKET,
                 reuse: Optional["StaticPrunedCache"] = None) -> None:
        if extra_tokens < 0 or bucket < 1:
            raise ValueError(f"extra_tokens must be >= 0 and bucket >= 1, got {extra_tokens}, {bucket}")
        self.extra_tokens = extra_tokens
        self.bucket = bucket
        self.key_buffers: list[torch.Tensor] = []  # per layer: [B, KV, capacity_l, hd]
        self.value_buffers: list[torch.Tensor] = []
        self.mask_buffers: list[torch.Tensor] = []  # per layer: [B, capacity_l] bool
        self.lengths: list[int] = []  # filled slots per layer
        self.seen_tokens = 0  # unpruned length, as PrunedCache
        self.padded = False
        self.released = False
        self.version = 0  # bumped whenever a buffer is replaced (a captured step is then stale)
        self.fill: Optional[torch.Tensor] = None  # [L] long on the device: `lengths` for a compiled step
        self._fill_stale = True  # `lengths` changed on the host since `fill` was written
        self._pool: list[tuple] = []
        if reuse is not None:  # take over the buffers of an earlier cache (same shapes: same graph)
            reuse._check_live()
            self._pool = list(zip(reuse.key_buffers, reuse.value_buffers, reuse.mask_buffers))
            self.fill = reuse.fill  # the same address too: a captured graph reads it
            reuse.released = True

    # -- views -------------------------------------------------------------------------------------
    @property
    def key_cache(self) -> list[torch.Tensor]:
        return [b[:, :, :n] for b, n in zip(self.key_buffers, self.lengths)]

    @property
    def value_cache(self) -> list[torch.Tensor]:
        return [b[:, :, :n] for b, n in zip(self.value_buffers, self.lengths)]

    @property
    def key_masks(self) -> list[torch.Tensor]:
        return [m[:, :n] for m, n in zip(self.mask_buffers, self.lengths)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, layer_idx: int):
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __iter__(self):
        for layer_idx in range(len(self)):
            yield self[layer_idx]

    def capacities(self) -> list[int]:
        return [m.shape[1] for m in self.mask_buffers]

    def capacity_bytes(self) -> int:
        """Bytes held by the key and value buffers (what the device really allocates)."""
        return sum(t.numel() * t.element_size() for t in self.key_buffers + self.value_buffers)

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def _check_live(self) -> None:
        if self.released:
            raise ReleasedCacheError(
                "this cache's buffers were reused by a later generate call on the fast path: continue a "
                "conversation before starting another, or enable_fast_path(model, reuse_buffers=False)")

    # -- growth ------------------------------------------------------------------------------------
    def _capacity(self, needed: int) -> int:
        return round_up(needed + self.extra_tokens, self.bucket)

    def _new_layer(self, layer_idx: int, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, needed: int) -> None:
        if self._pool and layer_idx < len(self._pool):
            k, v, m = self._pool[layer_idx]
            if (m.shape[1] >= needed + self.extra_tokens and k.shape[0] == batch and k.shape[1] == num_kv_heads
                    and k.shape[3] == head_dim and k.dtype == dtype and k.device == device):
                m.zero_()  # keys/values keep finite old values; the mask hides them
                self.key_buffers.append(k)
                self.value_buffers.append(v)
                self.mask_buffers.append(m)
                self.lengths.append(0)
                return
        cap = self._capacity(needed)
        # zeros: masked slots stay finite
        self.key_buffers.append(torch.zeros(batch, num_kv_heads, cap, head_dim, dtype=dtype, device=device))
        self.value_buffers.append(torch.zeros_like(self.key_buffers[-1]))
        self.mask_buffers.append(torch.zeros(batch, cap, dtype=torch.bool, device=device))
        self.lengths.append(0)
        self.version += 1

    def prepare_prefill(self, layer_lengths: list[int], like: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
        """Before a prefill's layer loop: every layer's buffers, layer l with room for `layer_lengths[l]`
        tokens plus `extra_tokens` (reused from the earlier cache where they fit): no allocation inside
        the loop (or, for a compiled prefill, inside `adopt_prefill`).

        like: [B, N, D] the hidden states entering the first layer (batch, dtype and device)."""
        self._check_live()
        if self.lengths:
            raise ValueError(f"prepare_prefill on a cache that already holds {len(self.lengths)} layers")
        for layer_idx, needed in enumerate(layer_lengths):
            self._new_layer(layer_idx, like.shape[0], num_kv_heads, head_dim, like.dtype, like.device, needed)

    def reserve(self, layer_idx: int, needed: int) -> None:
        """Grow layer `layer_idx`'s buffers to hold `needed` tokens (plus `extra_tokens`) if they cannot."""
        if self.mask_buffers[layer_idx].shape[1] >= needed:
            return
        cap, n = self._capacity(needed), self.lengths[layer_idx]
        for buffers in (self.key_buffers, self.value_buffers):
            old = buffers[layer_idx]
            new = old.new_zeros(*old.shape[:2], cap, old.shape[3])
            new[:, :, :n] = old[:, :, :n]
            buffers[layer_idx] = new
        mask = self.mask_buffers[layer_idx].new_zeros(self.mask_buffers[layer_idx].shape[0], cap)
        mask[:, :n] = self.mask_buffers[layer_idx][:, :n]
        self.mask_buffers[layer_idx] = mask
        self.version += 1

    # -- the eager decoder loop's interface (PrunedCache) -------------------------------------------
    def extend_key_mask(self, layer_idx: int, new_mask: torch.Tensor) -> torch.Tensor:
        """Write `new_mask` [B, Q] after layer `layer_idx`'s filled slots; return the mask [B, K_l].

        The layer's keys and values for the same Q tokens follow through `update`."""
        self._check_live()
        if layer_idx >= len(self.mask_buffers):  # the prefill: buffers come with the first update
            self._pending_mask = new_mask
            return new_mask
        n, q = self.lengths[layer_idx], new_mask.shape[1]
        self.reserve(layer_idx, n + q)
        self.mask_buffers[layer_idx][:, n:n + q] = new_mask
        return self.mask_buffers[layer_idx][:, :n + q]

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        """key_states, value_states: [B, KV, Q, hd] -> the layer's filled keys and values [B, KV, K_l, hd]."""
        self._check_live()
        q = key_states.shape[-2]
        if layer_idx == 0:
            self.seen_tokens += q
        if layer_idx == len(self.lengths):  # the prefill of this layer: allocate (or reuse) its buffers
            mask, self._pending_mask = getattr(self, "_pending_mask", None), None
            if mask is None or mask.shape != key_states.shape[::2]:  # no key mask given: all real
                mask = torch.ones(key_states.shape[0], q, dtype=torch.bool, device=key_states.device)
            B, KV, _, hd = key_states.shape
            self._new_layer(layer_idx, B, KV, hd, key_states.dtype, key_states.device, q)
            self.mask_buffers[layer_idx][:, :q] = mask
        elif layer_idx > len(self.lengths):
            raise ValueError(f"layer {layer_idx} updated before layer {len(self.lengths)}")
        n = self.lengths[layer_idx]
        if self.key_buffers[layer_idx].dtype != key_states.dtype:
            raise TypeError(f"layer {layer_idx}'s cache holds {self.key_buffers[layer_idx].dtype} but its keys are "
                            f"{key_states.dtype}: the prefill's hidden states and the layers must share a dtype")
        self.reserve(layer_idx, n + q)
        self.key_buffers[layer_idx][:, :, n:n + q] = key_states
        self.value_buffers[layer_idx][:, :, n:n + q] = value_states
        self.lengths[layer_idx] = n + q
        self._fill_stale = True  # host lengths changed: a compiled step reloads them
        return self.key_buffers[layer_idx][:, :, :n + q], self.value_buffers[layer_idx][:, :, :n + q]

    def adopt_prefill(self, staged: PrunedCache) -> None:
        """Take a prefill that was cached into `staged` (a compiled prefill, fast_prefill.py): copy every
        layer's keys, values and key mask into this cache's buffers (allocated by `prepare_prefill`)."""
        if any(self.lengths):
            raise ValueError("adopt_prefill needs an empty cache (prepare_prefill, or none)")
        for layer_idx, (k, v) in enumerate(zip(staged.key_cache, staged.value_cache)):  # [B, KV, K_l, hd]
            self.extend_key_mask(layer_idx, staged.key_masks[layer_idx])  # the eager loop's writes, after it
            self.update(k, v, layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._check_live()
        for buffers in (self.key_buffers, self.value_buffers, self.mask_buffers):
            for i, b in enumerate(buffers):
                b.copy_(b.index_select(0, beam_idx.to(b.device)))

    # -- the compiled decode step's interface -------------------------------------------------------
    def prepare_step(self) -> torch.Tensor:
        """Room for one more token in every layer; returns `fill` ([L] long, the slot each layer writes)."""
        self._check_live()
        for layer_idx, n in enumerate(self.lengths):
            self.reserve(layer_idx, n + 1)
        if self._fill_stale:
            lengths = torch.tensor(self.lengths, dtype=torch.long)
            device = self.key_buffers[0].device
            if self.fill is None or self.fill.shape != lengths.shape or self.fill.device != device:
                self.fill = lengths.to(device)
            else:
                self.fill.copy_(lengths)
            self._fill_stale = False
        return self.fill

    def advance(self) -> None:
        """After a compiled step wrote one token into every layer (and advanced `fill` on the device)."""
        self.lengths = [n + 1 for n in self.lengths]
        self.seen_tokens += 1
