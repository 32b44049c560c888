"""Token-selection rules: which visual tokens a pruning layer drops.

A selector sees one pruning layer at a time and returns a drop mask; the schedule (how many per
layer) comes from the recipe. Selectors are pure tensor code; the model owns the plumbing.
"""
from __future__ import annotations

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
    """The control: the same schedule, tokens chosen uniformly at random (seeded per call)."""

    name = "random"
    needs_attention = False

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._calls = 0

    def importance(self, layer_idx, attention, state, hidden):
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + layer_idx)
        noise = torch.rand(state.visual.shape, generator=gen).to(state.visual.device)
        return noise.masked_fill(~state.visual, float("inf"))


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


SELECTORS = {"fitprune": FitPruneSelector, "random": RandomSelector}


def make_selector(method: str = "fitprune", **kwargs) -> TokenSelector:
    if method not in SELECTORS:
        raise ValueError(f"unknown pruning method {method!r}; available: {sorted(SELECTORS)}")
    return SELECTORS[method](**kwargs)
