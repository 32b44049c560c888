"""Token scoring and selection: pure functions of tensors (no modules, no hooks).

Shapes: B batch, H heads, N tokens at the layer, R = N - row_start query rows whose attention the
scores read (the visual tokens and the text after them live in those rows).
"""
from __future__ import annotations

import torch


def head_max(probs: torch.Tensor) -> torch.Tensor:
    """probs: [B, H, R, N] softmax attention -> [B, R, N] max over heads."""
    return probs.amax(dim=1)


def fitprune_importance(
    head_max_rows: torch.Tensor, row_start: int, visual_mask: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """FitPrune's importance `self * cross` for every column; non-visual columns get +inf.

    head_max_rows: [B, R, N] head-max attention of query rows row_start..N-1
    visual_mask, text_mask: [B, N] bool (visual tokens alive; text tokens after the image)
    returns: [B, N] float32
    """
    m = head_max_rows.float()
    vis_rows = visual_mask[:, row_start:].float()  # [B, R]
    txt_rows = text_mask[:, row_start:].float()  # [B, R]
    n_visual = visual_mask.sum(-1, keepdim=True).clamp(min=1).float()  # [B, 1]
    self_score = torch.einsum("br,brn->bn", vis_rows, m) / n_visual  # [B, N]
    cross_score = torch.einsum("br,brn->bn", txt_rows, m)  # [B, N]
    return (self_score * cross_score).masked_fill(~visual_mask, float("inf"))


def drop_mask_lowest(importance: torch.Tensor, drop_counts: torch.Tensor, max_drop: int) -> torch.Tensor:
    """Mark, per sample, the `drop_counts[b]` columns of lowest importance (visual ones: others are +inf).

    importance: [B, N]; drop_counts: [B] long; max_drop: host int >= drop_counts.max()
    returns: [B, N] bool
    """
    B, N = importance.shape
    lowest = torch.topk(importance, max_drop, dim=-1, largest=False, sorted=True).indices  # [B, max_drop]
    take = torch.arange(max_drop, device=importance.device)[None, :] < drop_counts[:, None]  # [B, max_drop]
    drop = torch.zeros(B, N, dtype=torch.bool, device=importance.device)
    return drop.scatter_(1, lowest, take)


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
