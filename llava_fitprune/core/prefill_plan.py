"""The host-side schedule of one pruning prefill, made once before the first decoder layer.

Everything the layer loop needs from the host (per-layer, per-sample drop counts, the lengths
leaving every layer, the first query row the scores read) is read from the expanded inputs with
ONE device-to-host copy, and the few device tensors the loop needs (per-sample counts where
samples differ) are built here, once. Inside the loop nothing then waits for the device, which is
what keeps a batch-1 prefill from being bound by host synchronisation, and what lets the loop run
under `torch.compile` without graph breaks (fast_prefill.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .recipe import Recipe
from .selectors import OracleSelector, PruneState, TokenSelector


def text_after_last_image(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """visual, valid: [B, N] bool -> [B, N] bool text tokens after the last visual token."""
    pos = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, pos, -1).amax(-1, keepdim=True)  # [B, 1]
    return valid & ~visual & (pos[None, :] > last_visual) & (last_visual >= 0)


@dataclass
class LayerStep:
    """One pruning layer's part of the plan."""

    layer_idx: int
    counts: list[int]  # [B] tokens each sample drops here
    max_drop: int
    new_len: int  # rows leaving the layer
    counts_device: Optional[torch.Tensor]  # [B] long; None when every sample drops max_drop
    n_visual: Union[float, torch.Tensor]  # visual tokens alive entering: a float when equal, else [B, 1] float

    @property
    def equal(self) -> bool:
        return self.counts_device is None


@dataclass
class PrefillPlan:
    counts: list[list[int]]  # [L][B]
    lens: list[int]  # [L + 1] sequence length entering each layer, plus the final
    visual_entering: list[list[int]]  # [L + 1][B]
    real_entering: list[list[int]]  # [L + 1][B] real (non-padding) tokens entering each layer
    row_start: int  # first query row the scores read: the earliest first visual token of the batch
    last_real: list[int]  # [B] row of each sample's last real token
    padded: bool  # masks are needed: padding, or samples that drop different counts
    positions_shared: bool  # position ids equal the original positions (one gather serves both)
    steps: dict[int, LayerStep] = field(default_factory=dict)  # pruning layers only
    selector_data: Any = None  # what the selector gave the plan (the oracle: the layer of each position)

    @property
    def pruning_layers(self) -> list[int]:
        return sorted(self.steps)

    def initial_state(self, visual: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor) -> PruneState:
        """visual, valid, position_ids: [B, N] -> the bookkeeping the loop gathers along with the rows."""
        B, N = visual.shape
        orig_pos = torch.arange(N, device=visual.device).expand(B, N)
        return PruneState(visual=visual, text_after=text_after_last_image(visual, valid), valid=valid,
                          orig_pos=orig_pos, row_start=self.row_start, drop_counts=self.counts,
                          new_lens=self.lens, position_ids=None if self.positions_shared else position_ids)


def make_plan(num_layers: int, recipe: Optional[Recipe], selector: TokenSelector, visual: torch.Tensor,
              valid: torch.Tensor, position_ids: torch.Tensor, keep_empty: bool = False) -> Optional[PrefillPlan]:
    """The plan of a prefill, or None when it drops nothing (`keep_empty`: a plan without steps then,
    for its per-layer counts). One host read of the inputs' layout.

    visual, valid: [B, N] bool (visual: real visual tokens); position_ids: [B, N] long.
    """
    B, N = visual.shape
    device = visual.device
    pos = torch.arange(N, device=device)
    stats = torch.stack([
        visual.sum(-1),  # visual tokens per sample
        valid.sum(-1),  # real tokens per sample
        torch.where(visual, pos, N).amin(-1),  # first visual token (N: none)
        torch.where(valid, pos, -1).amax(-1),  # last real token
        (position_ids == pos).all(-1).long(),  # position ids are the original positions
    ])  # [5, B]
    oracle = isinstance(selector, OracleSelector)
    selector_data = None
    if oracle:
        oracle_counts, selector_data = selector.plan_counts(num_layers, B, N, device)
        stats = torch.cat([stats, oracle_counts])  # + [L, B]
    host = stats.tolist()  # the one device-to-host read of the prefill
    n_visual, n_real, first_visual, last_real, same_pos = host[:5]
    if oracle:
        counts = host[5:]
    else:
        per_sample = [recipe.drops_for(n) for n in n_visual]  # [B][L]
        counts = [[per_sample[b][l] for b in range(B)] for l in range(num_layers)]
    if not keep_empty and not any(max(c) > 0 for c in counts):
        return None
    lens, vis_entering, real_entering = [N], [list(n_visual)], [list(n_real)]
    for l in range(num_layers):
        real_entering.append([r - d for r, d in zip(real_entering[-1], counts[l])])
        lens.append(lens[-1] if max(counts[l]) == 0 else max(real_entering[-1]))
        vis_entering.append([v - d for v, d in zip(vis_entering[-1], counts[l])])
    unequal = [l for l in range(num_layers) if len(set(counts[l])) > 1]
    plan = PrefillPlan(counts, lens, vis_entering, real_entering, row_start=min(first_visual), last_real=last_real,
                       padded=min(n_real) < N or bool(unequal), positions_shared=all(same_pos),
                       selector_data=selector_data)
    counts_device = _device_counts(counts, device) if unequal else None  # [L, B], once per prefill
    uneven_visual = [l for l in range(num_layers) if len(set(vis_entering[l])) > 1]
    n_visual_device = None
    if uneven_visual:  # FitPrune's self score divides by each sample's count
        n_visual_device = _device_counts(vis_entering, device).float().clamp(min=1)[..., None]  # [L + 1, B, 1]
    for l in range(num_layers):
        if max(counts[l]) == 0:
            continue
        plan.steps[l] = LayerStep(
            layer_idx=l, counts=counts[l], max_drop=max(counts[l]), new_len=lens[l + 1],
            counts_device=counts_device[l] if l in unequal else None,
            n_visual=n_visual_device[l] if l in uneven_visual else float(max(vis_entering[l][0], 1)),
        )
    return plan


def _device_counts(counts: list[list[int]], device: torch.device) -> torch.Tensor:
    """Host counts -> a long tensor on `device`, without making the host wait for the device's queue."""
    t = torch.tensor(counts, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
