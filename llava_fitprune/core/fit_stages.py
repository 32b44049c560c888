"""Few-stage schedules for `fit(..., max_pruning_layers=K)`: which K layers prune, and how much.

Every pruning layer pays its scoring and gathers (launches on a GPU) however few tokens it drops,
so a user may cap the number of pruning layers (layers with a non-zero drop) at K.

The rule. FitPrune's simulation at tolerance alpha gives, for every layer l, the cumulative
tokens gone after it, C_l (run over all layers, no stop): the earliest each token may leave
while every layer keeps at least (1 - alpha) of its attention mass. A K-stage schedule for
alpha picks stage layers p_1 < ... < p_k (k <= K) and lets tokens leave only there:

    G_l = C_{p_j}  for p_j <= l < p_{j+1}   (0 before p_1),   d_{p_j} = C_{p_j} - C_{p_{j-1}}

so G_l <= C_l at every layer: tokens leave late, never earlier than the tolerance allows, and no
layer is pruned harder than at alpha. Of these schedules, `stage_schedule` returns the one with
the least FLOPs (under the fit's FLOPs convention), found exactly by dynamic programming over
(last stage, stages used). The fit then bisects alpha for the least alpha whose best K-stage
schedule meets the budget, and trims the last stage as the unconstrained fit does.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

from .flops import LMShape, layer_prefill_flops, lm_head_flops, paper_visual_macs
from .recipe import RecipeError


def check_max_pruning_layers(k, num_layers: Optional[int] = None) -> Optional[int]:
    """None (no cap) or a whole number in [1, num_layers] (num_layers None: not yet known, any k >= 1);
    anything else is an error naming the fix."""
    if k is None:
        return None
    top = num_layers if num_layers is not None else math.inf
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
        upto = f"from 1 to {num_layers} (this model's decoder layers)" if num_layers is not None else ">= 1"
        raise RecipeError(f"max_pruning_layers must be a whole number {upto}, got {k!r}: pass e.g. "
                          f"--max-pruning-layers {min(4, top)}, or omit it for no cap")
    return k


def pruning_layers(drops: Sequence[int]) -> int:
    """Layers with a non-zero drop."""
    return sum(1 for d in drops if d > 0)


def _layer_cost(shape: LMShape, num_text: int, num_visual: int, convention: str):
    """cost(gone_in, gone_out) of one decoder layer, with the visual tokens gone before and after its
    drop; and tail(gone) for after the last layer. Sums to `prefill_report`'s pruned cost (tested)."""
    if convention == "total":
        @lru_cache(maxsize=None)
        def cost(gone_in: int, gone_out: int) -> int:
            n = num_text + num_visual
            return layer_prefill_flops(shape, n - gone_in, n - gone_out)

        def tail(gone: int) -> int:
            return lm_head_flops(shape, num_text + num_visual - gone)
    elif convention == "visual_only":
        @lru_cache(maxsize=None)
        def cost(gone_in: int, gone_out: int) -> int:
            return paper_visual_macs(shape, [num_visual - gone_in, num_visual - gone_out])  # counts [1:] only

        def tail(gone: int) -> int:
            return 0
    else:
        raise ValueError(f"unknown FLOPs convention {convention!r}: use 'total' or 'visual_only'")
    return cost, tail


def stage_schedule(shape: LMShape, num_text: int, num_visual: int, drops: Sequence[int], max_stages: int,
                   convention: str) -> list[int]:
    """The least-FLOPs schedule with at most `max_stages` pruning layers whose cumulative drops stay at or
    below those of `drops` (a full simulated schedule) at every layer; see the module doc.

    Exact DP: best[k][j] = least cost of layers 0..j with k stages, the last at j. Ties keep the first
    found (fewer stages, then earlier layers), so the result is deterministic.
    """
    L = shape.num_layers
    full = list(drops) + [0] * (L - len(drops))
    C, run = [], 0
    for d in full:
        run += int(d)
        C.append(run)
    cost, tail = _layer_cost(shape, num_text, num_visual, convention)
    K = min(max_stages, L)
    INF = None
    best = [[INF] * L for _ in range(K + 1)]  # best[k][j]
    parent = [[-1] * L for _ in range(K + 1)]
    for j in range(L):
        best[1][j] = j * cost(0, 0) + cost(0, C[j])
    for k in range(2, K + 1):
        for j in range(k - 1, L):
            for i in range(k - 2, j):
                if best[k - 1][i] is None:
                    continue
                v = best[k - 1][i] + (j - i - 1) * cost(C[i], C[i]) + cost(C[i], C[j])
                if best[k][j] is None or v < best[k][j]:
                    best[k][j], parent[k][j] = v, i
    choice, value = (0, -1), L * cost(0, 0) + tail(0)  # no stage at all
    for k in range(1, K + 1):
        for j in range(L):
            if best[k][j] is None:
                continue
            v = best[k][j] + (L - 1 - j) * cost(C[j], C[j]) + tail(C[j])
            if v < value:
                choice, value = (k, j), v
    out, (k, j) = [0] * L, choice
    while k > 0:
        i = parent[k][j] if k > 1 else -1
        out[j] = C[j] - (C[i] if i >= 0 else 0)
        k, j = k - 1, i
    return out
