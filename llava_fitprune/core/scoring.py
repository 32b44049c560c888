"""Token scoring and selection: pure functions of tensors (no modules, no hooks).

Shapes: B batch, H heads, N tokens at the layer, R = N - row_start query rows whose attention the
scores read (the visual tokens and the text after them live in those rows).

Ties: among equal importances the token at the lower position is dropped first. Every selection
below ranks with a stable sort over the rows in their current order, which within a sample is the
original order (padding and pruning never reorder a sample's tokens), so a sample drops the same
tokens alone and inside any batch, also when every score is equal (no text after the image, a
blank image).
"""
from __future__ import annotations

from typing import Optional, Union

import torch


def head_max(probs: torch.Tensor) -> torch.Tensor:
    """probs: [B, H, R, N] softmax attention -> [B, R, N] max over heads."""
    return probs.amax(dim=1)


def head_max_row_sums(head_max_rows: torch.Tensor, row_start: int, row_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums over the query rows of the head-max map, for every column.

    head_max_rows: [B, R, N] head-max attention of query rows row_start..N-1; row_weights: [B, N, C]
    float, each row's weight in each of the C sums (rows before row_start are not read).
    returns: [B, C, N] float32. (A compiled pruning step makes the same sums for the last R columns
    only, [B, C, R]: the columns before row_start are never visual. `fitprune_from_sums` takes both.)
    """
    m = head_max_rows if head_max_rows.dtype == torch.float32 else head_max_rows.float()
    rows = row_weights[:, row_start:]  # [B, R, C]
    rows = rows if rows.dtype == m.dtype else rows.to(m.dtype)
    return torch.einsum("brc,brn->bcn", rows, m)  # [B, C, N]


def fitprune_from_sums(sums: torch.Tensor, visual_mask: torch.Tensor,
                       n_visual: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """FitPrune's importance `self * cross` from the row sums (`head_max_row_sums` with the weights
    (visual, text after)); non-visual columns get +inf.

    sums: [B, 2, W] (self sum before / n_visual, cross) of the last W columns (W = N, or the score
    rows' R, whose earlier columns are never visual); visual_mask: [B, N] bool; n_visual: visual
    tokens alive per sample, a float or [B, 1] float; None counts `visual_mask`.
    returns: [B, N] float32
    """
    if n_visual is None:
        n_visual = visual_mask.sum(-1, keepdim=True).clamp(min=1).float()  # [B, 1]
    importance = sums.prod(1) / n_visual  # [B, W]
    skipped = visual_mask.shape[-1] - importance.shape[-1]
    if skipped:
        importance = torch.nn.functional.pad(importance, (skipped, 0))  # [B, N]
    return torch.where(visual_mask, importance, float("inf"))


def fitprune_importance(head_max_rows: torch.Tensor, row_start: int, visual_mask: torch.Tensor,
                        text_mask: Optional[torch.Tensor],
                        n_visual: Optional[Union[float, torch.Tensor]] = None,
                        row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FitPrune's importance `self * cross` for every column; non-visual columns get +inf.

    head_max_rows: [B, R, N] head-max attention of query rows row_start..N-1
    visual_mask, text_mask: [B, N] bool (visual tokens alive; text tokens after the image)
    n_visual: visual tokens alive per sample, when the caller knows it: a float (the same for every
    sample) or [B, 1] float; None counts `visual_mask`.
    row_weights: [B, N, 2] float (visual, text after), when kept by the caller (then `text_mask`
    is not read).
    returns: [B, N] float32
    """
    if row_weights is None:
        row_weights = torch.stack((visual_mask, text_mask), -1)
    sums = head_max_row_sums(head_max_rows, row_start, row_weights)  # [B, 2, N]: self sum, cross
    return fitprune_from_sums(sums, visual_mask, n_visual)


def lowest_first(importance: torch.Tensor) -> torch.Tensor:
    """importance: [B, N] -> [B, N] column order, lowest importance first, lower position first
    among equal importances (a stable sort: `topk` leaves the order of ties unspecified)."""
    return torch.sort(importance, dim=-1, stable=True).indices


def drop_mask_lowest(importance: torch.Tensor, drop_counts: Optional[torch.Tensor], max_drop: int) -> torch.Tensor:
    """Mark, per sample, the `drop_counts[b]` columns of lowest importance (visual ones: others are +inf).

    importance: [B, N]; drop_counts: [B] long, or None when every sample drops `max_drop`;
    max_drop: host int >= drop_counts.max(). Ties: see the module docstring.
    returns: [B, N] bool
    """
    B, N = importance.shape
    lowest = lowest_first(importance)[:, :max_drop]  # [B, max_drop]
    drop = torch.zeros(B, N, dtype=torch.bool, device=importance.device)
    if drop_counts is None:
        return drop.scatter_(1, lowest, True)
    take = torch.arange(max_drop, device=importance.device)[None, :] < drop_counts[:, None]  # [B, max_drop]
    return drop.scatter_(1, lowest, take)


def keep_rows_lowest(importance: torch.Tensor, drop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample drops `drop` columns of lowest importance: (kept rows [B, N - drop] in their
    order, the column order [B, N] whose first `drop` are the dropped rows). Two sorts, no mask:
    the fast path of an equal count per sample."""
    order = lowest_first(importance)  # [B, N]
    return torch.sort(order[:, drop:], dim=-1).values, order


def keep_index(drop: torch.Tensor, new_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept tokens in original order, left-filled per sample to `new_len`.

    drop: [B, N] bool. A sample that keeps fewer than `new_len` tokens is filled up on the left
    with some of its dropped positions, flagged as not kept (they act as padding), so the last row
    of every sample stays its last real token.
    returns: index [B, new_len] long, kept [B, new_len] bool
    """
    B, N = drop.shape
    pos = torch.arange(N, device=drop.device).expand(B, N)
    order = torch.where(drop, pos - N, pos)  # dropped sort before kept, each in original order
    sorted_key = torch.sort(order, dim=-1).values[:, N - new_len:]  # [B, new_len]
    return sorted_key % N, sorted_key >= 0


def drop_mask_from_positions(orig_pos: torch.Tensor, drop_positions: torch.Tensor) -> torch.Tensor:
    """Oracle selection: drop tokens whose original position is listed (negative entries = none).

    orig_pos: [B, N] long; drop_positions: [B, D] long -> [B, N] bool
    """
    return (orig_pos[:, :, None] == drop_positions[:, None, :]).any(-1)
