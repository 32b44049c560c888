"""Who owns a static cache's buffers: the buffers outlive their cache, for the next conversation.

The fast path (fast_path.py) keeps the newest cache's `BufferSet` in its `BufferPool`, with a weak
reference to that cache. A new conversation takes the set over only when the cache is gone (nothing
references it any more: the user dropped it, or never had it, as with `generate` returning ids
only) or was released (its `generate` call failed, so it was never handed out). A cache still
held keeps its buffers: the new conversation allocates its own, so a kept conversation is never
overwritten, reads its own values and continues exactly as on the eager path. Taking the set over
keeps the buffers' addresses (and `fill`'s), so a CUDA graph captured on them is replayed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .static_cache import StaticPrunedCache


@dataclass(eq=False)
class BufferSet:
    """One cache's buffers, which a later conversation may take over (BufferPool)."""
    keys: list = field(default_factory=list)  # per layer: [B, KV, capacity_l, hd]
    values: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # per layer: [B, capacity_l] bool
    fill: Optional[torch.Tensor] = None  # [L] long: each layer's next slot, read by a compiled step


class BufferPool:
    """The newest cache's buffers, kept for the next conversation. `take` hands them over only when
    that cache is gone (no reference left anywhere) or released; while someone holds it, it keeps
    its buffers and the next conversation allocates its own."""

    def __init__(self) -> None:
        self._buffers: Optional[BufferSet] = None
        self._owner = lambda: None  # weak reference to the cache using `_buffers`

    def owner(self) -> Optional["StaticPrunedCache"]:
        return self._owner()

    def take(self) -> Optional[BufferSet]:
        owner = self._owner()
        if self._buffers is None or (owner is not None and not owner.released):
            return None
        buffers, self._buffers = self._buffers, None
        return buffers

    def keep(self, cache: "StaticPrunedCache") -> None:
        self._buffers, self._owner = cache.buffers, weakref.ref(cache)
