"""Token-selection rules: which visual tokens a pruning layer drops.

A selector sees one pruning layer at a time and returns a drop mask; the schedule (how many per
layer) comes from the recipe. Selectors are pure tensor code; the model owns the plumbing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import torch

from .scoring import drop_mask_from_positions, drop_mask_lowest, fitprune_importance, head_max


@dataclass
class PruneState:
    """Per-token bookkeeping of one prefill, gathered along with the hidden states. All [B, N]."""

    visual: torch.Tensor  # bool: a visual token still alive
    text_after: torch.Tensor  # bool: a text token after the (last) image
    valid: torch.Tensor  # bool: a real token (not padding)
    orig_pos: torch.Tensor  # long: index in the unpruned prefill sequence
    row_start: int  # first query row the attention scores need (min first visual index)
    drop_counts: list[list[int]]  # [L][B] tokens each sample drops at each layer
    new_lens: list[int]  # sequence length entering each layer, plus the final (L + 1)

    def gather(self, index: torch.Tensor, kept: torch.Tensor) -> None:
        self.visual = self.visual.gather(1, index) & kept
        self.text_after = self.text_after.gather(1, index) & kept
        self.valid = self.valid.gather(1, index) & kept
        self.orig_pos = self.orig_pos.gather(1, index)


@dataclass
class LayerAttention:
    """Softmax attention of query rows row_start..N-1 at one layer (what the scores read)."""

    probs: torch.Tensor  # [B, H, R, N] float32
    row_start: int

    @cached_property
    def head_max(self) -> torch.Tensor:  # [B, R, N]
        return head_max(self.probs)


class TokenSelector:
    """Base rule: drop the `d` lowest-importance visual tokens. Subclasses define `importance`."""

    name = "base"
    needs_attention = True  # whether `attention` must be computed at pruning layers

    def importance(self, layer_idx: int, attention: Optional[LayerAttention], state: PruneState,
                   hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def drop_mask(self, layer_idx: int, attention: Optional[LayerAttention], state: PruneState,
                  hidden: torch.Tensor, drop_counts: torch.Tensor, max_drop: int) -> torch.Tensor:
        imp = self.importance(layer_idx, attention, state, hidden)  # [B, N], +inf off visual tokens
        return drop_mask_lowest(imp, drop_counts, max_drop)


class FitPruneSelector(TokenSelector):
    """FitPrune: importance = self score x cross score from head-max attention."""

    name = "fitprune"

    def importance(self, layer_idx, attention, state, hidden):
        return fitprune_importance(attention.head_max, attention.row_start, state.visual, state.text_after)


class RandomSelector(TokenSelector):
    """The control: the same schedule, tokens chosen at random.

    The noise is a fixed hash of (seed, layer, position of the token within its sample), so a
    sample drops the same tokens alone or inside a padded batch of any size, in every run.
    """

    name = "random"
    needs_attention = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def importance(self, layer_idx, attention, state, hidden):
        return position_noise(state.orig_pos, state.valid, self.seed, layer_idx).masked_fill(~state.visual, float("inf"))


_HASH_MULT = 0x45D9F3B  # Mueller's 32-bit integer hash multiplier (< 2**27: products fit in int64)
_MASK32 = 0xFFFFFFFF
_SHIFT = 16


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer hash on [0, 2**32), elementwise on int64 tensors."""
    x = x & _MASK32
    x = ((x >> _SHIFT) ^ x) * _HASH_MULT & _MASK32
    x = ((x >> _SHIFT) ^ x) * _HASH_MULT & _MASK32
    return (x >> _SHIFT) ^ x


def position_noise(orig_pos: torch.Tensor, valid: torch.Tensor, seed: int, layer_idx: int) -> torch.Tensor:
    """orig_pos, valid: [B, N] -> [B, N] float64 in [0, 1), a function of each token's position
    within its sample (counted from the sample's first real token, so padding does not shift it)."""
    first = torch.where(valid, orig_pos, orig_pos.new_full((), torch.iinfo(torch.int64).max)).amin(-1, keepdim=True)
    salt = int(hash32(hash32(torch.tensor(seed)) + layer_idx))
    return hash32(orig_pos - first + salt).double() / float(_MASK32 + 1)


class FastVSelector(TokenSelector):
    """FastV: drop the visual tokens the last prompt token attends to least (mean over heads).

    FastV's "layer K" is the first layer without the dropped tokens, ranked by the attention map of
    layer K - 1; here drops happen after a layer's attention, so FastV's K is a drop at index K - 1
    (see `methods.fastv_drops`).
    """

    name = "fastv"

    def importance(self, layer_idx, attention, state, hidden):
        return fastv_importance(attention.probs, attention.row_start, state.valid, state.visual)


def fastv_importance(probs: torch.Tensor, row_start: int, valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """probs: [B, H, R, N] attention of rows row_start..N-1; valid, visual: [B, N] bool.

    Returns [B, N]: the head-mean attention from each sample's last real token (the last prompt
    token) to every column; +inf off the visual tokens.
    """
    B, H, R, N = probs.shape
    pos = torch.arange(N, device=valid.device)
    last = torch.where(valid, pos, -1).amax(-1)  # [B]
    if bool((last < row_start).any()):
        raise ValueError("FastV needs the last prompt token among the attention rows (after the first visual token)")
    rows = (last - row_start)[:, None, None].expand(B, 1, N)  # [B, 1, N]
    from_last = probs.float().mean(1).gather(1, rows).squeeze(1)  # [B, N]
    return from_last.masked_fill(~visual, float("inf"))


class UniformSelector(FitPruneSelector):
    """The `uniform` baseline's rule: FitPrune's scores (the schedule is what differs)."""

    name = "uniform"


@dataclass
class OracleSelector(TokenSelector):
    """Drop given original positions (no scoring): replays a trace, or times the schedule alone.

    drop_positions[l]: [B, D_l] long original positions to drop at layer l (-1 = padding entry).
    """

    drop_positions: Sequence[Optional[torch.Tensor]] = field(default_factory=list)
    name = "oracle"
    needs_attention = False

    def drop_mask(self, layer_idx, attention, state, hidden, drop_counts, max_drop):
        pos = self.drop_positions[layer_idx]
        return drop_mask_from_positions(state.orig_pos, pos.to(state.orig_pos.device))

    def counts(self, num_layers: int, batch: int) -> list[list[int]]:
        out = []
        for l in range(num_layers):
            pos = self.drop_positions[l] if l < len(self.drop_positions) else None
            out.append([0] * batch if pos is None else (pos >= 0).sum(-1).tolist())
        return out


SELECTORS = {"fitprune": FitPruneSelector, "random": RandomSelector, "fastv": FastVSelector,
             "uniform": UniformSelector}
_LAZY_SELECTORS = {"lvprune": ("llava_fitprune.lvprune.selector", "LVPruneSelector")}  # imported on use


def selector_class(method: str) -> type:
    if method in _LAZY_SELECTORS:
        module, name = _LAZY_SELECTORS[method]
        return getattr(importlib.import_module(module), name)
    if method not in SELECTORS:
        raise ValueError(f"unknown pruning method {method!r}; available: {sorted(SELECTORS) + sorted(_LAZY_SELECTORS)}")
    return SELECTORS[method]


def make_selector(method: str = "fitprune", **kwargs) -> TokenSelector:
    return selector_class(method)(**kwargs)
