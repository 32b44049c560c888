"""A KV cache of fixed-size buffers, one per layer, sized at prefill: the decode fast path's cache.

Layer l's buffers hold its own (pruned) prefill length plus room for tokens still to come, rounded
up to a bucket: [B, KV, capacity_l, hd] keys and values and a [B, capacity_l] key mask (True = a
real token; unfilled slots and padding are False). A decode step then has fixed shapes (it writes
slot `lengths[l]` of every layer and attends over the whole buffer under the mask), so it can be
compiled once and replayed as a CUDA graph; the pruned layers' buffers are shorter, so the smaller
cache is a real saving in memory and in bytes read per step.

The room (`decode_room`): every layer gets the same room R beyond what it holds (then its capacity
is rounded up to the bucket), R = min(tokens still to come, max(bucket, min(M, context left))),
where M is the mean number of tokens a layer holds, rounded down to the bucket, less one bucket
(for the rounding up), the tokens still to come start at `max_new_tokens` and the context left is
the model's `max_position_embeddings` minus the tokens seen. So the cache never reserves more than
it holds (reserved slots <= max(2 x held, held + 2 buckets per layer)), whatever `max_new_tokens`.
When a decode step finds a layer full, every layer grows at once to its held length plus a new
room (copying): the held length about doubles per growth, so T new tokens after a prefill whose
layers hold M tokens on average see about log2((M + T) / M) + 1 buffer shapes, each compiled or
captured once; the eager loop grows a layer alone when it appends to it.

The eager decoder loop (modeling.py) runs on this cache unchanged: `extend_key_mask` and `update`
append into the buffers (growing a layer's buffers when a call needs more room), and
`key_cache`/`value_cache`/`key_masks` are views of the filled slots.

Buffers outlive their cache in a `BufferPool` (static_buffers.py; fast_path.py holds one per
model): the next conversation takes them over only from a cache nobody holds any more (or one whose
generate call failed, `release`), so a cache you keep is never overwritten and can be continued.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cache import PrunedCache
from .static_buffers import BufferSet

DEFAULT_BUCKET = 64  # capacities are rounded up to this: nearby prompt lengths share buffer shapes


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def decode_room(held: list[int], remaining: int, bucket: int, context_left: Optional[int] = None) -> int:
    """The room every layer gets beyond its held tokens when its buffers are (re)allocated.

    held: tokens each layer holds (with those being written); remaining: tokens still to come;
    context_left: the model's context length minus the tokens seen (None: no cap)."""
    mean = sum(held) // max(len(held), 1)
    room = mean // bucket * bucket - bucket  # less one bucket: the per-layer rounding up adds less
    if context_left is not None:
        room = min(room, context_left)
    return max(0, min(remaining, max(bucket, room)))


class ReleasedCacheError(RuntimeError):
    pass


class StaticPrunedCache(PrunedCache):
    """Per-layer fixed-size KV buffers with room for `extra_tokens` more tokens (see `decode_room`)."""

    # DynamicCache.__init__ is not called: key_cache / value_cache are views (properties) here.
    def __init__(self, extra_tokens: int, bucket: int = DEFAULT_BUCKET, reuse: Optional[BufferSet] = None,
                 context_length: Optional[int] = None) -> None:
        """extra_tokens: tokens still to come (max_new_tokens; decode steps count it down); reuse: the
        buffers of an earlier cache to take over where they fit (BufferPool.take: nobody uses them);
        context_length: the model's (max_position_embeddings), which caps the room."""
        if extra_tokens < 0 or bucket < 1:
            raise ValueError(f"extra_tokens must be >= 0 and bucket >= 1, got {extra_tokens}, {bucket}")
        self.extra_tokens = extra_tokens
        self.bucket = bucket
        self.context_length = context_length
        self.buffers = BufferSet()
        self.lengths: list[int] = []  # filled slots per layer
        self.seen_tokens = 0  # unpruned length, as PrunedCache
        self.padded = False
        self.released = False
        self.version = 0  # bumped whenever a buffer is replaced (a captured step is then stale)
        self._fill_stale = True  # `lengths` changed on the host since `fill` was written
        self._reuse: list[Optional[tuple]] = []  # per layer: (keys, values, mask) to take over
        if reuse is not None:  # moved out of the earlier set, which nobody uses any more
            self._reuse = list(zip(reuse.keys, reuse.values, reuse.masks))
            self.buffers.fill = reuse.fill  # the same address too: a captured graph reads it
            reuse.keys, reuse.values, reuse.masks, reuse.fill = [], [], [], None

    # -- views -------------------------------------------------------------------------------------
    @property
    def key_buffers(self) -> list[torch.Tensor]:
        return self.buffers.keys

    @property
    def value_buffers(self) -> list[torch.Tensor]:
        return self.buffers.values

    @property
    def mask_buffers(self) -> list[torch.Tensor]:
        return self.buffers.masks

    @property
    def fill(self) -> Optional[torch.Tensor]:
        return self.buffers.fill

    @property
    def key_cache(self) -> list[torch.Tensor]:
        self._check_live()
        return [b[:, :, :n] for b, n in zip(self.key_buffers, self.lengths)]

    @property
    def value_cache(self) -> list[torch.Tensor]:
        self._check_live()
        return [b[:, :, :n] for b, n in zip(self.value_buffers, self.lengths)]

    @property
    def key_masks(self) -> list[torch.Tensor]:
        self._check_live()
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
        self._check_live()
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def release(self) -> None:
        """Give the buffers up (the fast path does so for a cache whose generate call failed): a later
        conversation may take them over; reading or continuing this cache raises from now on."""
        self.released = True

    def _check_live(self) -> None:
        if self.released:
            raise ReleasedCacheError(
                "this cache's generate call failed and its buffers went to later conversations: it holds "
                "nothing to read or continue; start that conversation again")

    # -- growth ------------------------------------------------------------------------------------
    def _room(self, held: list[int], remaining: int) -> int:
        left = None if self.context_length is None else self.context_length - self.seen_tokens
        return decode_room(held, remaining, self.bucket, left)

    def _new_layer(self, layer_idx: int, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, needed: int, room: int) -> None:
        want = round_up(needed + room, self.bucket)
        if layer_idx < len(self._reuse) and self._reuse[layer_idx] is not None:
            (k, v, m), self._reuse[layer_idx] = self._reuse[layer_idx], None
            # at most twice the capacity asked for: a much larger buffer is given back, not kept
            if (want <= m.shape[1] <= 2 * want and k.shape[0] == batch and k.shape[1] == num_kv_heads
                    and k.shape[3] == head_dim and k.dtype == dtype and k.device == device):
                m.zero_()  # keys/values keep finite old values; the mask hides them
                self.key_buffers.append(k)
                self.value_buffers.append(v)
                self.mask_buffers.append(m)
                self.lengths.append(0)
                return
        # zeros: masked slots stay finite
        self.key_buffers.append(torch.zeros(batch, num_kv_heads, want, head_dim, dtype=dtype, device=device))
        self.value_buffers.append(torch.zeros_like(self.key_buffers[-1]))
        self.mask_buffers.append(torch.zeros(batch, want, dtype=torch.bool, device=device))
        self.lengths.append(0)
        self.version += 1

    def prepare_prefill(self, layer_lengths: list[int], like: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
        """Before a prefill's layer loop: every layer's buffers, layer l with room for `layer_lengths[l]`
        tokens plus the room (`decode_room`; reused from the earlier cache where they fit): no
        allocation inside the loop (or, for a compiled prefill, inside `adopt_prefill`).

        like: [B, N, D] the hidden states entering the first layer (batch, dtype and device)."""
        self._check_live()
        if self.lengths:
            raise ValueError(f"prepare_prefill on a cache that already holds {len(self.lengths)} layers")
        left = None if self.context_length is None else self.context_length - layer_lengths[0]
        room = decode_room(layer_lengths, self.extra_tokens, self.bucket, left)  # layer 0: the whole prompt
        for layer_idx, needed in enumerate(layer_lengths):
            self._new_layer(layer_idx, like.shape[0], num_kv_heads, head_dim, like.dtype, like.device, needed, room)
        self._reuse = []  # what did not fit is freed, not kept

    def _grow(self, layer_idx: int, capacity: int) -> None:
        """Layer `layer_idx`'s buffers, `capacity` slots long (copied), if they are shorter."""
        if self.mask_buffers[layer_idx].shape[1] >= capacity:
            return
        n = self.lengths[layer_idx]
        for buffers in (self.key_buffers, self.value_buffers):
            old = buffers[layer_idx]
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, :n] = old[:, :, :n]
            buffers[layer_idx] = new
        mask = self.mask_buffers[layer_idx].new_zeros(self.mask_buffers[layer_idx].shape[0], capacity)
        mask[:, :n] = self.mask_buffers[layer_idx][:, :n]
        self.mask_buffers[layer_idx] = mask
        self.version += 1

    def _remaining(self) -> int:
        """Tokens still to come for a growth: past the announced count, a bucket at a time."""
        return self.extra_tokens if self.extra_tokens > 0 else self.bucket

    def reserve(self, layer_idx: int, needed: int) -> None:
        """Grow layer `layer_idx`'s buffers to hold `needed` tokens (plus the room) if they cannot."""
        if self.mask_buffers[layer_idx].shape[1] >= needed:
            return
        held = [needed if i == layer_idx else n for i, n in enumerate(self.lengths)]
        self._grow(layer_idx, round_up(needed + self._room(held, self._remaining()), self.bucket))

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
            room = self._room(self.lengths + [q], self.extra_tokens)  # no prepare_prefill: from the layers so far
            self._new_layer(layer_idx, B, KV, hd, key_states.dtype, key_states.device, q, room)
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
        needed = [n + 1 for n in self.lengths]
        if any(n > c for n, c in zip(needed, self.capacities())):  # a layer is full: all grow at once
            room = self._room(needed, self._remaining())
            for layer_idx, n in enumerate(needed):
                self._grow(layer_idx, round_up(n + room, self.bucket))
        if self._fill_stale:
            lengths = torch.tensor(self.lengths, dtype=torch.long)
            device = self.key_buffers[0].device
            if self.fill is None or self.fill.shape != lengths.shape or self.fill.device != device:
                self.buffers.fill = lengths.to(device)
            else:
                self.fill.copy_(lengths)
            self._fill_stale = False
        return self.fill

    def advance(self) -> None:
        """After a compiled step wrote one token into every layer (and advanced `fill` on the device)."""
        self.lengths = [n + 1 for n in self.lengths]
        self.seen_tokens += 1
        self.extra_tokens = max(0, self.extra_tokens - 1)
