"""One decoder layer that drops visual tokens, and the masks and rotary table pruning needs."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ...core.selectors import LayerAttention, PruneState, TokenSelector, take_rows

# Pruning layers compute the probabilities of the attention rows the scores read in one piece when
# they hold at most this many elements ([B, H, rows, keys]), else in blocks of that size, so they
# stay in a CPU core's cache (or, on a GPU, bound the memory while keeping kernels large); each
# block attends to the causal keys only.
BLOCK_ELEMENTS = {"cuda": 2 ** 25}
BLOCK_ELEMENTS_DEFAULT = 2 ** 19
MIN_BLOCK_ROWS = 16
# Devices whose pruning layers compute the score rows' attention once: SDPA for the rows before
# the image, an explicit softmax (block by block when eager, in one piece when compiled) for the
# score rows, which gives both their output and the scores. Fewest FLOPs (the FLOPs model's
# count), a few more ops: for a compute-bound CPU. Elsewhere SDPA runs over every row as in the
# stock layer and the score rows' probabilities are made once more: fewest launches (a GPU at
# batch 1 is bound by them), at the cost of one more query-key product for those rows.
SCORE_ROWS_ONCE_DEVICES = {"cpu"}


class RopeSpan:
    """Shared by a model's RopeTables: the length the cos/sin table must cover in this forward."""

    length: int = 0

    @staticmethod
    def cached_length(layers) -> int:
        """The length the layers' rotary tables already hold (they all hold the same)."""
        rope = layers[0].self_attn.rotary_emb
        return int(getattr(getattr(rope, "inner", rope), "max_seq_len_cached", 0))


class RopeTable(nn.Module):
    """Wraps a layer's rotary embedding (per instance) so its table covers `span.length` positions.

    transformers 4.37 builds cos/sin for the current key length only; after pruning, kept tokens
    keep their original position ids, which index past that length.
    """

    def __init__(self, inner: nn.Module, span: RopeSpan):
        super().__init__()
        self.inner = inner
        self.span = span

    def forward(self, x, seq_len=None):
        return self.inner(x, seq_len=max(seq_len or 0, self.span.length))


def attention_mask_4d(key_mask: torch.Tensor, q_len: int, past_len: int, dtype: torch.dtype, impl: str,
                      padded: bool) -> Optional[torch.Tensor]:
    """The mask a stock attention module takes, for queries that are the last `q_len` keys.

    key_mask: [B, K] bool. Returns None where the module's own causal handling suffices, a 2-D
    mask for flash_attention_2, else an additive [B, 1, q_len, K] mask.
    """
    if impl == "flash_attention_2":
        return key_mask.long() if padded else None
    if not padded and (q_len == 1 or (impl == "sdpa" and past_len == 0)):
        return None
    B, K = key_mask.shape
    q_pos = torch.arange(q_len, device=key_mask.device) + past_len  # [Q]
    k_pos = torch.arange(K, device=key_mask.device)  # [K]
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask[:, None, :]  # [B, Q, K]
    mask = torch.zeros(B, 1, q_len, K, dtype=dtype, device=key_mask.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def tail_probs(q: torch.Tensor, k: torch.Tensor, r0: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention probabilities of query rows r0..N-1 in one piece.

    q, k: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal).
    returns: probs [B, H, R, N] float32 (R = N - r0)
    """
    N, hd = q.shape[2], q.shape[3]
    logits = torch.einsum("bhrd,bhnd->bhrn", q[:, :, r0:], k).div_(math.sqrt(hd))  # [B, H, R, N]
    if mask is None:
        future = torch.ones(N - r0, N, dtype=torch.bool, device=q.device).triu_(r0 + 1)  # key j > row r0 + i
        logits.masked_fill_(future, torch.finfo(logits.dtype).min)
    else:
        logits.add_(mask[:, :, r0:, :])
    return F.softmax(logits, dim=-1, dtype=torch.float32)


def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: int, mask: Optional[torch.Tensor]):
    """Softmax attention of query rows r0..N-1 in one piece, with the full probabilities.

    q, k, v: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal).
    returns: out [B, H, R, hd], probs [B, H, R, N] float32 (R = N - r0)
    """
    probs = tail_probs(q, k, r0, mask)
    return torch.matmul(probs.to(v.dtype), v), probs


def attention_blocks(B: int, H: int, N: int, R: int, device: torch.device) -> tuple[int, int]:
    """(samples, rows) per block so that a block's probabilities [samples, H, rows, N] fit the budget."""
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS_DEFAULT)
    rows = min(max(R, 1), max(MIN_BLOCK_ROWS, budget // max(H * N, 1)))
    return max(1, min(B, budget // max(H * rows * N, 1))), rows


def tail_head_max(q: torch.Tensor, k: torch.Tensor, r0: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Head-max attention map of query rows r0..N-1: [B, R, N] float32, 0 above the diagonal.

    One piece when the probabilities fit the block budget (`attention_blocks`) or under torch.compile,
    else block by block (`blocked_head_max`), without a [B, H, R, N] tensor.
    q, k: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal)
    """
    if torch.compiler.is_compiling():  # one piece: a Python loop over blocks would fix the prompt length in the graph
        return tail_probs(q, k, r0, mask).amax(dim=1)
    B, H, N, hd = q.shape
    samples, rows = attention_blocks(B, H, N, N - r0, q.device)
    if samples >= B and rows >= N - r0:
        return tail_probs(q, k, r0, mask).amax(dim=1)
    return blocked_head_max(q, k, r0, mask)


def attention_rows_head_max(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: int,
                            mask: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Attention of rows r0..N-1 written into `out`, block by block; returns their head-max map.

    The same values as `attention_rows`, without a [B, H, R, N] tensor (`blocked_head_max`).
    q, k, v: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal); out: [B, H, N, hd] (rows
    r0.. are written). returns: head_max [B, R, N] float32, 0 above the diagonal
    """
    return blocked_head_max(q, k, r0, mask, v, out)


def blocked_head_max(q: torch.Tensor, k: torch.Tensor, r0: int, mask: Optional[torch.Tensor],
                     v: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-max map of rows r0..N-1 made in blocks of a few samples and rows (`attention_blocks`), each
    block against the keys up to its last row (keys past it have probability 0); with `v` and `out`,
    each block's attention output is written into `out` too.
    q, k, v: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal); out: [B, H, N, hd]
    returns: head_max [B, R, N] float32, 0 above the diagonal
    """
    B, H, N, hd = q.shape
    head_max = torch.zeros(B, N - r0, N, dtype=torch.float32, device=q.device)
    samples, rows = attention_blocks(B, H, N, N - r0, q.device)
    lowest = torch.finfo(q.dtype).min
    for s0 in range(0, B, samples):
        s1 = min(s0 + samples, B)
        for a in range(r0, N, rows):
            b = min(a + rows, N)
            logits = torch.matmul(q[s0:s1, :, a:b], k[s0:s1, :, :b].transpose(2, 3))  # [S, H, b-a, b]
            logits.div_(math.sqrt(hd))
            if mask is None:  # within the block's own keys a..b-1, key j > row i is the future
                future = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu_(1)
                logits[..., a:].masked_fill_(future, lowest)
            else:
                logits.add_(mask[s0:s1, :, a:b, :b])
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [S, H, b-a, b]
            if out is not None:
                out[s0:s1, :, a:b] = torch.matmul(probs.to(v.dtype), v[s0:s1, :, :b])
            head_max[s0:s1, a - r0:b - r0, :b] = probs.amax(dim=1)
    return head_max


class TailAttention(LayerAttention):
    """A pruning layer's attention as the scores read it, made on first use: the head-max map of
    rows row_start..N-1 ([B, R, N] float32, block by block when large) or the probabilities
    ([B, H, R, N], in one piece) for a selector that asks for them; or the row sums a compiled
    attention region made (`_row_sums`, for the selector's own `row_weights`). (Plain properties,
    not functools.cached_property, whose lock `torch.compile` cannot trace.)"""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, row_start: int, mask: Optional[torch.Tensor]):
        self.row_start = row_start
        self._qkm = (q, k, mask)
        self._probs: Optional[torch.Tensor] = None
        self._head_max: Optional[torch.Tensor] = None
        self._row_sums: Optional[torch.Tensor] = None  # [B, C, W], made with the selector's row_weights

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            q, k, mask = self._qkm
            self._probs = tail_probs(q, k, self.row_start, mask)
        return self._probs

    @property
    def head_max(self) -> torch.Tensor:
        if self._head_max is None:
            q, k, mask = self._qkm
            self._head_max = (self._probs.amax(dim=1) if self._probs is not None
                              else tail_head_max(q, k, self.row_start, mask))
        return self._head_max

    def row_sums(self, weights: torch.Tensor) -> torch.Tensor:
        return self._row_sums if self._row_sums is not None else super().row_sums(weights)

    def __repr__(self) -> str:
        return f"TailAttention(row_start={self.row_start})"


def pruning_layer_forward(
    layer: nn.Module,
    layer_idx: int,
    hidden_states: torch.Tensor,
    mask: Optional[torch.Tensor],
    cache,
    state: PruneState,
    selector: TokenSelector,
    step,
):
    """A `LlamaDecoderLayer` prefill step that drops tokens after its attention.

    The rows the scores read (the visual tokens and the text after them, from `state.row_start`)
    get their softmax probabilities when the selector reads attention: on a CPU (eager or compiled)
    computed once, with their output (`SCORE_ROWS_ONCE_DEVICES`); elsewhere SDPA runs over every
    row as in the stock layer and those rows' probabilities are made once more (`TailAttention`). The dropped tokens serve as
    keys and values here and stay in this layer's cache; their rows leave before `o_proj` and the
    MLP. `state` follows the kept rows. Nothing here reads the device from the host: counts and
    lengths come from the plan (`step`, a prefill_plan.LayerStep).
    hidden_states: [B, N, D]; mask: additive [B, 1, N, N] or None (causal, no padding)
    returns: (hidden_states [B, step.new_len, D], DropRecord)
    """
    attn = layer.self_attn
    if getattr(attn.config, "pretraining_tp", 1) > 1:
        raise NotImplementedError("pretraining_tp > 1 is not supported by pruning layers")
    B, N, D = hidden_states.shape
    H, KV, hd = attn.num_heads, attn.num_key_value_heads, attn.head_dim

    residual = hidden_states
    x = layer.input_layernorm(hidden_states)
    q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
    k = attn.k_proj(x).view(B, N, KV, hd).transpose(1, 2)  # [B, KV, N, hd]
    v = attn.v_proj(x).view(B, N, KV, hd).transpose(1, 2)  # [B, KV, N, hd]
    cos, sin = attn.rotary_emb(v, seq_len=N)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, state.positions)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)  # a prefill: the layer's cache was empty
    k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)  # [B, H, N, hd]
    r0 = min(state.row_start, N)
    attention = None
    if selector.needs_attention and q.device.type in SCORE_ROWS_ONCE_DEVICES:
        out_rows = q.new_empty(B, N, H, hd)  # filled through a [B, H, N, hd] view
        out = out_rows.transpose(1, 2)  # [B, H, N, hd]
        out[:, :, :r0] = F.scaled_dot_product_attention(  # rows before the image
            q[:, :, :r0], k[:, :, :r0], v[:, :, :r0],
            attn_mask=None if mask is None else mask[:, :, :r0, :r0],
            is_causal=mask is None and state.row_start > 1)  # = r0 > 1 (row_start < N), a host bool when compiled
        attention = TailAttention(q, k, r0, mask)
        if selector.reads_head_max and not torch.compiler.is_compiling():  # block by block, the output with it
            attention._head_max = attention_rows_head_max(q, k, v, r0, mask, out)
        else:  # one piece (compiled: a Python loop over blocks would fix the prompt length in the graph)
            tail, attention._probs = attention_rows(q, k, v, r0, mask)  # [B, H, R, hd], [B, H, R, N]
            out[:, :, r0:] = tail
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, N, hd]
        if selector.needs_attention:
            attention = TailAttention(q, k, r0, mask)

    state.n_visual = step.n_visual
    index, kept, record = selector.keep_rows(layer_idx, attention, state, hidden_states, step)  # [B, new_len]

    out, residual = take_rows([out.transpose(1, 2).reshape(B, N, H * hd), residual], index)  # [B, new_len, .]
    hidden_states = residual + attn.o_proj(out)
    hidden_states = hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
    state.gather(index, kept, selector.tracked)
    return hidden_states, record
