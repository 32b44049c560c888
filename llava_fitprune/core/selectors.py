"""Token-selection rules: which visual tokens a pruning layer drops.

A selector sees one pruning layer at a time and returns a drop mask; the schedule (how many per
layer) comes from the recipe. Selectors are pure tensor code; the model owns the plumbing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional, Sequence, Union

import torch

from .scoring import (drop_mask_from_positions, drop_mask_lowest, fitprune_from_sums, head_max, head_max_row_sums,
                      keep_index, keep_rows_lowest)


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
    position_ids: Optional[torch.Tensor] = None  # long: rotary positions; None: the same as orig_pos
    n_visual: Optional[Union[float, torch.Tensor]] = None  # visual alive at this layer (float or [B, 1]); None: count
    prepared: Any = None  # what the selector's `prepare` made for this prefill
    token_data: Optional[torch.Tensor] = None  # [B, N, C] per-token data a selector keeps, gathered with the rows

    @property
    def positions(self) -> torch.Tensor:
        return self.orig_pos if self.position_ids is None else self.position_ids

    def gather(self, index: torch.Tensor, kept: Optional[torch.Tensor], tracked=("visual", "text_after")) -> None:
        """Follow the rows a pruning layer keeps: index [B, new_len]; kept [B, new_len] bool, or None
        when every row of `index` is a kept token (no left fill). Of `visual`, `text_after`, only
        the `tracked` ones follow (the others become None); `valid`, `orig_pos`, `position_ids`
        and `token_data` always do."""
        names = self.gathered(tracked)
        self.set_rows(names, take_rows([getattr(self, n) for n in names], index), kept, tracked)

    def gathered(self, tracked=("visual", "text_after")) -> list[str]:
        """The fields `gather` takes the kept rows of (each [B, N, ...])."""
        names = [n for n in ("visual", "text_after") if n in tracked and getattr(self, n) is not None]
        return names + ["valid", "orig_pos"] + [n for n in ("position_ids", "token_data") if getattr(self, n) is not None]

    def set_rows(self, names: list[str], values: Sequence[torch.Tensor], kept: Optional[torch.Tensor],
                 tracked=("visual", "text_after")) -> None:
        """The kept rows of the fields `names` (`gathered`), taken by the caller (e.g. inside a compiled
        region); kept as in `gather`."""
        for name, value in zip(names, values):
            setattr(self, name, value)
        for name in ("visual", "text_after"):
            if name not in tracked:
                setattr(self, name, None)
        if kept is not None:
            for name in ("visual", "text_after", "valid"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name) & kept)
            if self.token_data is not None:
                self.token_data = self.token_data * kept[..., None]


def take_rows(tensors: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Rows `index` [B, n] of each tensor [B, N, ...] along dim 1: one index_select each at batch 1,
    else one gather each (the expanded index shared between tensors of the same trailing shape)."""
    if index.shape[0] == 1:
        flat = index[0]
        return [t.index_select(1, flat) for t in tensors]
    expanded = {}
    out = []
    for t in tensors:
        tail = tuple(t.shape[2:])
        if not tail:
            out.append(t.gather(1, index))
            continue
        if tail not in expanded:
            expanded[tail] = index.view(*index.shape, *(1 for _ in tail)).expand(*index.shape, *tail)
        out.append(t.gather(1, expanded[tail]))
    return out


@dataclass
class LayerAttention:
    """Softmax attention of query rows row_start..N-1 at one layer (what the scores read)."""

    probs: torch.Tensor  # [B, H, R, N] float32
    row_start: int

    @cached_property
    def head_max(self) -> torch.Tensor:  # [B, R, N]
        return head_max(self.probs)

    def row_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """weights: [B, N, C] -> [B, C, W] weighted sums over the rows of the head-max map, for the last
        W columns: all N here, the R from row_start in a compiled step (core/scoring.head_max_row_sums)."""
        return head_max_row_sums(self.head_max, self.row_start, weights)


class TokenSelector:
    """Base rule: drop the `d` lowest-importance visual tokens. Subclasses define `importance`.

    Ties: the lower position is dropped first (core/scoring.py), alone or in any batch.
    """

    name = "base"
    needs_attention = True  # whether `attention` must be computed at pruning layers
    tracked = ("visual", "text_after")  # PruneState masks the selector reads after the first pruning layer
    reads_head_max = False  # reads `attention.head_max` only (never `probs`): it can be made block by block
    # reads only `attention.row_sums(self.row_weights(state))`: a compiled prefill then makes the sums in
    # its attention region, causal blocks of rows at a time, and never the [B, R, N] head-max map
    reads_row_sums = False
    # with reads_row_sums and the base `keep_rows`: importance = row_sums_importance(sums [B, C, W],
    # visual [B, N], None), a pure function of tensors (n_visual counted from `visual`), so a compiled
    # prefill runs a whole pruning layer, selection included, as one region
    row_sums_importance = None

    def row_weights(self, state: PruneState) -> Optional[torch.Tensor]:
        """[B, N, C] float: each row's weight in the sums `importance` reads (`reads_row_sums`)."""
        return None

    def importance(self, layer_idx: int, attention: Optional[LayerAttention], state: PruneState,
                   hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, state: PruneState, plan) -> None:
        """Once per prefill, before the first layer (host data in `plan`): checks, device tensors.
        Store what the layers need in `state.prepared`."""

    def drop_mask(self, layer_idx: int, attention: Optional[LayerAttention], state: PruneState,
                  hidden: torch.Tensor, drop_counts: Optional[torch.Tensor], max_drop: int) -> torch.Tensor:
        imp = self.importance(layer_idx, attention, state, hidden)  # [B, N], +inf off visual tokens
        return drop_mask_lowest(imp, drop_counts, max_drop)

    def keep_rows(self, layer_idx: int, attention: Optional[LayerAttention], state: PruneState,
                  hidden: torch.Tensor, step) -> tuple[torch.Tensor, Optional[torch.Tensor], "DropRecord"]:
        """The rows a pruning layer keeps: (index [B, new_len], kept [B, new_len] bool or None when
        every indexed row is kept, what was dropped). `step`: the plan's LayerStep."""
        if step.equal:  # every sample drops max_drop: two sorts, rows stay in place
            index, order = keep_rows_lowest(self.importance(layer_idx, attention, state, hidden), step.max_drop)
            return index, None, DropRecord(state.orig_pos, state.valid, order=order, count=step.max_drop)
        drop = self.drop_mask(layer_idx, attention, state, hidden, step.counts_device, step.max_drop)  # [B, N]
        index, kept = keep_index(drop | ~state.valid, step.new_len)
        return index, kept, DropRecord(state.orig_pos, state.valid, mask=drop)


@dataclass
class DropRecord:
    """What one pruning layer dropped, kept as the loop had it; `positions()` makes the trace's
    [B, N] original positions (-1 = kept) only when someone reads it."""

    orig_pos: torch.Tensor  # [B, N] long, entering the layer
    valid: torch.Tensor  # [B, N] bool, entering the layer
    order: Optional[torch.Tensor] = None  # [B, N] rows, the first `count` dropped
    count: int = 0
    mask: Optional[torch.Tensor] = None  # [B, N] bool dropped rows
    layer_of: Optional[torch.Tensor] = None  # [B, N0] layer dropping each original position (oracle)
    layer_idx: int = -1

    def positions(self) -> torch.Tensor:
        mask = self.mask
        if mask is None and self.order is not None:
            mask = torch.zeros_like(self.valid).scatter_(1, self.order[:, :self.count], True)
        if mask is None:
            mask = self.layer_of.gather(1, self.orig_pos) == self.layer_idx
        return torch.where(mask & self.valid, self.orig_pos, -1)


class FitPruneSelector(TokenSelector):
    """FitPrune: importance = self score x cross score from head-max attention."""

    name = "fitprune"
    tracked = ("visual",)  # the text after the image rides in token_data
    reads_head_max = True
    reads_row_sums = True
    row_sums_importance = staticmethod(fitprune_from_sums)

    def prepare(self, state, plan):
        state.token_data = torch.stack((state.visual, state.text_after), -1).float()  # [B, N, 2] row weights

    def row_weights(self, state):
        return state.token_data  # [B, N, 2]: (visual, text after)

    def importance(self, layer_idx, attention, state, hidden):
        sums = attention.row_sums(state.token_data)  # [B, 2, W]: self sum, cross
        return self.row_sums_importance(sums, state.visual, state.n_visual)


class RandomSelector(TokenSelector):
    """The control: the same schedule, tokens chosen at random.

    The noise is a fixed hash of (seed, layer, position of the token within its sample), so a
    sample drops the same tokens alone or inside a padded batch of any size, in every run.
    """

    name = "random"
    needs_attention = False
    tracked = ("visual",)

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def importance(self, layer_idx, attention, state, hidden):
        return position_noise(state.orig_pos, state.valid, self.seed, layer_idx).masked_fill(~state.visual, float("inf"))


_HASH_MULT = 0x45D9F3B  # Mueller's 32-bit integer hash multiplier (< 2**27: products fit in int64)
_MASK32 = 0xFFFFFFFF
_SHIFT = 16


def hash32(x):
    """A bijective integer hash on [0, 2**32), elementwise on int64 tensors (or on a Python int)."""
    x = x & _MASK32
    x = ((x >> _SHIFT) ^ x) * _HASH_MULT & _MASK32
    x = ((x >> _SHIFT) ^ x) * _HASH_MULT & _MASK32
    return (x >> _SHIFT) ^ x


def position_noise(orig_pos: torch.Tensor, valid: torch.Tensor, seed: int, layer_idx: int) -> torch.Tensor:
    """orig_pos, valid: [B, N] -> [B, N] float64 in [0, 1), a function of each token's position
    within its sample (counted from the sample's first real token, so padding does not shift it)."""
    first = torch.where(valid, orig_pos, orig_pos.new_full((), torch.iinfo(torch.int64).max)).amin(-1, keepdim=True)
    salt = hash32(hash32(seed) + layer_idx)  # Python ints: no tensor, no host read
    return hash32(orig_pos - first + salt).double() / float(_MASK32 + 1)


class FastVSelector(TokenSelector):
    """FastV: drop the visual tokens the last prompt token attends to least (mean over heads).

    FastV's "layer K" is the first layer without the dropped tokens, ranked by the attention map of
    layer K - 1; here drops happen after a layer's attention, so FastV's K is a drop at index K - 1
    (see `methods.fastv_drops`).
    """

    name = "fastv"
    tracked = ("visual",)

    def prepare(self, state, plan):
        if any(last < plan.row_start for last in plan.last_real):
            raise ValueError("FastV needs the last prompt token among the attention rows (after the first visual token)")

    def importance(self, layer_idx, attention, state, hidden):
        return fastv_importance(attention.probs, attention.row_start, state.valid, state.visual)


def fastv_importance(probs: torch.Tensor, row_start: int, valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """probs: [B, H, R, N] attention of rows row_start..N-1; valid, visual: [B, N] bool.

    Returns [B, N]: the head-mean attention from each sample's last real token (the last prompt
    token) to every column; +inf off the visual tokens. Each sample's last real token must be a
    row >= row_start (FastVSelector.prepare checks it on the host, before the layers).
    """
    B, H, R, N = probs.shape
    pos = torch.arange(N, device=valid.device)
    last = torch.where(valid, pos, -1).amax(-1)  # [B]
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
    Before the first layer, `prepare` maps every original position to the layer that drops it
    and, when every sample drops the same count at every layer, the rows each layer keeps: a
    pruning layer then costs an index and the gathers.
    """

    drop_positions: Sequence[Optional[torch.Tensor]] = field(default_factory=list)
    name = "oracle"
    needs_attention = False
    tracked = ()

    def _listed(self, num_layers: int) -> list[int]:
        return [l for l in range(min(num_layers, len(self.drop_positions))) if self.drop_positions[l] is not None]

    def drop_mask(self, layer_idx, attention, state, hidden, drop_counts, max_drop):
        pos = self.drop_positions[layer_idx]
        return drop_mask_from_positions(state.orig_pos, pos.to(state.orig_pos.device))

    def plan_counts(self, num_layers: int, batch: int, seq_len: int, device: torch.device):
        """([L, B] long tokens each sample drops at each layer, [B, seq_len] long layer that drops each
        original position (num_layers: never)), on `device`, for the plan's one host read."""
        listed = self._listed(num_layers)
        never = num_layers
        if not listed:
            return torch.zeros(num_layers, batch, dtype=torch.long, device=device), None
        dev = [self.drop_positions[l] if self.drop_positions[l].device == device else self.drop_positions[l].to(device)
               for l in listed]
        positions = torch.cat(dev, 1)  # [B, sum D_l], -1 = none
        widths = torch.tensor([p.shape[1] for p in dev], device=device)
        layer_ids = torch.tensor(listed, device=device).repeat_interleave(widths, output_size=positions.shape[1])
        listed_at = torch.where(positions >= 0, layer_ids, never)  # [B, sum D_l]
        counts = torch.zeros(batch, num_layers + 1, dtype=torch.long, device=device)
        counts = counts.scatter_add_(1, listed_at, torch.ones_like(listed_at))[:, :num_layers].T  # [L, B]
        layer_of = torch.full((batch, seq_len + 1), never, dtype=torch.long, device=device)  # column seq_len: none
        layer_of = layer_of.scatter_(1, torch.where(positions >= 0, positions, seq_len), listed_at)[:, :seq_len]
        return counts, layer_of

    def prepare(self, state, plan):
        N = state.orig_pos.shape[1]
        layer_of = plan.selector_data  # [B, N]
        layers = plan.pruning_layers
        index = None
        if all(plan.steps[l].equal for l in layers):  # rows stay in place: each layer keeps the survivors in order
            ids = torch.tensor(layers, device=layer_of.device)[:, None, None]  # [P, 1, 1]
            row = (layer_of[None] >= ids).cumsum(-1) - 1  # [P, B, N] row of each position entering the layer
            index = torch.where(layer_of[None] > ids, row, N).sort(-1).values  # [P, B, N] kept rows first
        state.prepared = (layer_of, {l: j for j, l in enumerate(layers)}, index)

    def keep_rows(self, layer_idx, attention, state, hidden, step):
        layer_of, slot, index = state.prepared
        record = DropRecord(state.orig_pos, state.valid, layer_of=layer_of, layer_idx=layer_idx)
        if index is not None:  # N - max_drop rows stay (new_len, written from the shape for a compiled loop)
            return index[slot[layer_idx], :, :state.orig_pos.shape[1] - step.max_drop], None, record
        drop = layer_of.gather(1, state.orig_pos) == layer_idx  # [B, N]
        index, kept = keep_index(drop | ~state.valid, step.new_len)
        return index, kept, record


SELECTORS = {"fitprune": FitPruneSelector, "random": RandomSelector, "fastv": FastVSelector,
             "uniform": UniformSelector}
# Methods defined above the core, by the package that registers them when imported (the core never imports it).
EXTERNAL_METHODS = {"lvprune": "llava_fitprune.lvprune"}


def register_selector(cls: type) -> None:
    """Add the selector of a method defined above the core (`cls.name` must be in EXTERNAL_METHODS)."""
    if cls.name not in EXTERNAL_METHODS:
        raise ValueError(f"selector {cls.name!r} is not an external method {sorted(EXTERNAL_METHODS)}")
    SELECTORS[cls.name] = cls


def selector_class(method: str) -> type:
    if method in SELECTORS:
        return SELECTORS[method]
    if method in EXTERNAL_METHODS:
        raise ValueError(f"method {method!r} is defined in {EXTERNAL_METHODS[method]}, which registers it when "
                         f"imported: `import {EXTERNAL_METHODS[method]}` first")
    raise ValueError(f"unknown pruning method {method!r}; available: {sorted(SELECTORS) + sorted(EXTERNAL_METHODS)}")


def make_selector(method: str = "fitprune", **kwargs) -> TokenSelector:
    return selector_class(method)(**kwargs)
