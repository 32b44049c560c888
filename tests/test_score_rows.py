"""The row sums of the head-max map (what FitPrune's importance reads), made three ways, agree:

- from the probabilities in one piece (`tail_probs` -> head max -> `head_max_row_sums`: the reference);
- in causal blocks from the flash kernel's log-sum-exp, the maximum over heads before the exp
  (`rows_head_max_sums`, what a compiled pruning step runs), eagerly and under torch.compile with the
  sequence length dynamic, also for fewer score rows than blocks (empty blocks) and with padding;
- and the importance from the sums equals `fitprune_importance` from the map.
"""
import math

import pytest
import torch

from llava_fitprune.adapters.llava.layer_regions import ROW_SUM_BLOCKS, attention_and_scores, rows_head_max_sums
from llava_fitprune.adapters.llava.layer_step import attention_mask_4d, tail_probs
from llava_fitprune.core.scoring import fitprune_from_sums, fitprune_importance, head_max_row_sums


def _case(N: int, r0: int, padded: bool, seed: int = 0, B: int = 2, H: int = 4, hd: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, hd, generator=g) for _ in range(3))
    valid = torch.ones(B, N, dtype=torch.bool)
    if padded:
        valid[1, :3] = False  # sample 1 is left-padded by 3
    visual = torch.zeros(B, N, dtype=torch.bool)
    visual[:, r0:N - 2] = True
    visual &= valid
    text = torch.zeros(B, N, dtype=torch.bool)
    text[:, N - 2:] = True
    weights = torch.stack((visual, text), -1).float()  # [B, N, 2]
    mask = attention_mask_4d(valid, N, 0, torch.float32, "eager", True) if padded else None
    return q, k, v, mask, weights, visual


def _lse(q, k, v, mask):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, mask is None, attn_mask=mask)[1]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("N, r0", [(6, 3), (12, 4), (40, 5), (41, 0)])
def test_block_sums_equal_the_one_piece_reference(N, r0, padded):
    q, k, v, mask, weights, visual = _case(N, r0, padded)
    reference = head_max_row_sums(tail_probs(q, k, r0, mask).amax(dim=1), r0, weights)  # [B, 2, N]
    sums = rows_head_max_sums(q, k, r0, mask, _lse(q, k, v, mask)[:, :, r0:], weights)  # [B, 2, R]
    assert sums.shape == (q.shape[0], 2, N - r0) and reference.shape == (q.shape[0], 2, N)
    torch.testing.assert_close(sums, reference[..., r0:], atol=1e-6, rtol=1e-5)
    # the importance from the sums is FitPrune's from the map
    head_max = tail_probs(q, k, r0, mask).amax(dim=1)
    torch.testing.assert_close(fitprune_from_sums(sums, visual), fitprune_importance(
        head_max, r0, visual, None, row_weights=weights), atol=1e-7, rtol=1e-5)


def test_region_scores_kinds_agree_on_the_cpu():
    """attention_and_scores: the row sums equal the sums of the head-max map it returns, and the
    output equals SDPA's."""
    q, k, v, mask, weights, _ = _case(30, 6, padded=True)
    out, sums = attention_and_scores(q, k, v, mask, 6, "row_sums", weights)
    out_h, head_max = attention_and_scores(q, k, v, mask, 6, "head_max")
    torch.testing.assert_close(sums, head_max_row_sums(head_max, 6, weights)[..., 6:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(out, out_h)


def test_compiled_block_sums_follow_the_length():
    """Under torch.compile (aot_eager: the graph, not the kernels) with the length dynamic: one graph for
    every length, fewer score rows than blocks included (no size-1 specialisation), the same values as
    eager."""
    torch._dynamo.reset()

    def f(q, k, v, weights):
        return rows_head_max_sums(q, k, 4, None, _lse(q, k, v, None)[:, :, 4:], weights)

    from torch._dynamo.utils import counters

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False)
    start = counters["stats"]["unique_graphs"]
    for N in (60, 47, 33, 4 + ROW_SUM_BLOCKS - 1):  # the last: fewer score rows (R) than blocks
        q, k, v, _, weights, _ = _case(N, 4, padded=False, seed=N)
        for t in (q, k, v):
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(weights, 1)
        torch.testing.assert_close(compiled(q, k, v, weights), f(q, k, v, weights), atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - start == 1  # every length, fewer rows than blocks too
    assert math.isfinite(float(compiled(q, k, v, weights).sum()))
