"""One decoder layer that drops visual tokens, and the masks and rotary table pruning needs."""
from __future__ import annotations

import math
from functools import cached_property
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ...core.scoring import keep_index
from ...core.selectors import FitPruneSelector, LayerAttention, PruneState, TokenSelector

# Pruning layers compute the attention rows the scores read in blocks of rows: each block holds at
# most this many probabilities ([B, H, rows, keys]), so it stays in a CPU core's cache (or, on a GPU,
# bounds the memory while keeping kernels large), and each block attends to the causal keys only.
BLOCK_ELEMENTS = {"cuda": 2 ** 25}
BLOCK_ELEMENTS_DEFAULT = 2 ** 19
MIN_BLOCK_ROWS = 16


class RopeSpan:
    """Shared by a model's RopeTables: the length the cos/sin table must cover in this forward."""

    length: int = 0


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


def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: int, mask: Optional[torch.Tensor]):
    """Softmax attention of query rows r0..N-1 in one piece, with the full probabilities.

    q, k, v: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal).
    returns: out [B, H, R, hd], probs [B, H, R, N] float32 (R = N - r0)
    """
    N, hd = q.shape[2], q.shape[3]
    logits = torch.matmul(q[:, :, r0:], k.transpose(2, 3)) / math.sqrt(hd)  # [B, H, R, N]
    if mask is None:
        causal = torch.arange(N, device=q.device)[None, :] > torch.arange(r0, N, device=q.device)[:, None]
        logits = logits.masked_fill(causal, torch.finfo(logits.dtype).min)
    else:
        logits = logits + mask[:, :, r0:, :]
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [B, H, R, N]
    return torch.matmul(probs.to(v.dtype), v), probs


def attention_blocks(B: int, H: int, N: int, R: int, device: torch.device) -> tuple[int, int]:
    """(samples, rows) per block so that a block's probabilities [samples, H, rows, N] fit the budget."""
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS_DEFAULT)
    rows = min(max(R, 1), max(MIN_BLOCK_ROWS, budget // max(H * N, 1)))
    return max(1, min(B, budget // max(H * rows * N, 1))), rows


def attention_rows_head_max(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: int,
                            mask: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Attention of rows r0..N-1 written into `out`, block by block; returns their head-max map.

    The same values as `attention_rows` (keys past a block's last row have probability 0 and are
    skipped), without a [B, H, R, N] tensor: blocks of a few samples and rows (`attention_blocks`).
    q, k, v: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal); out: [B, H, N, hd] (rows
    r0.. are written). returns: head_max [B, R, N] float32, 0 above the diagonal
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
            out[s0:s1, :, a:b] = torch.matmul(probs.to(v.dtype), v[s0:s1, :, :b])
            head_max[s0:s1, a - r0:b - r0, :b] = probs.amax(dim=1)
    return head_max


class HeadMaxAttention(LayerAttention):
    """A pruning layer's attention as FitPrune reads it: the head-max map of rows row_start..N-1
    ([B, R, N] float32), made block by block with the output. `probs` ([B, H, R, N]) is rebuilt
    only if a selector asks for it."""

    def __init__(self, head_max: torch.Tensor, row_start: int, rebuild_probs):
        self.__dict__["head_max"] = head_max  # LayerAttention.head_max is a cached_property
        self.row_start = row_start
        self._rebuild_probs = rebuild_probs

    @cached_property
    def probs(self) -> torch.Tensor:
        return self._rebuild_probs()

    def __repr__(self) -> str:
        return f"HeadMaxAttention(head_max={tuple(self.head_max.shape)}, row_start={self.row_start})"


def pruning_layer_forward(
    layer: nn.Module,
    layer_idx: int,
    hidden_states: torch.Tensor,
    key_mask: torch.Tensor,
    padded: bool,
    position_ids: torch.Tensor,
    cache,
    state: PruneState,
    selector: TokenSelector,
    new_len: int,
):
    """A `LlamaDecoderLayer` prefill step that drops tokens after its attention.

    The dropped tokens serve as keys and values here and stay in this layer's cache; their rows
    leave before `o_proj` and the MLP. Rows before `state.row_start` go through SDPA; the rows
    the scores read (visual tokens and the text after them) through an explicit softmax, once: for
    FitPrune in row blocks that keep only the head-max map (`attention_rows_head_max`), for other
    selectors in one piece with the full probabilities (`attention_rows`).
    hidden_states: [B, N, D] -> ([B, new_len, D], index [B, new_len], kept [B, new_len],
    dropped original positions [B, N] with -1 where kept)
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
    q, k = apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)  # a prefill: the layer's cache was empty
    k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)  # [B, H, N, hd]

    mask = attention_mask_4d(key_mask, N, 0, q.dtype, "eager", True) if padded else None  # [B, 1, N, N]
    attention = None
    if selector.needs_attention:
        out = q.new_empty(B, N, H, hd)  # filled through a [B, H, N, hd] view; reshapes to [B, N, D] for free
        r0 = min(state.row_start, N)
        out.transpose(1, 2)[:, :, :r0] = F.scaled_dot_product_attention(  # rows before the image
            q[:, :, :r0], k[:, :, :r0], v[:, :, :r0],
            attn_mask=None if mask is None else mask[:, :, :r0, :r0], is_causal=mask is None and r0 > 1)
        if isinstance(selector, FitPruneSelector):  # reads the head-max map only: block by block
            head_max = attention_rows_head_max(q, k, v, r0, mask, out.transpose(1, 2))
            attention = HeadMaxAttention(head_max, r0, lambda: attention_rows(q, k, v, r0, mask)[1])
        else:
            tail, probs = attention_rows(q, k, v, r0, mask)  # [B, H, R, hd], [B, H, R, N]
            out.transpose(1, 2)[:, :, r0:] = tail
            attention = LayerAttention(probs, r0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)

    counts = state.drop_counts[layer_idx]
    counts_t = torch.tensor(counts)  # [B]
    if q.device.type == "cuda":  # pinned + non_blocking: the host does not wait for the GPU's queue
        counts_t = counts_t.pin_memory()
    counts_t = counts_t.to(q.device, non_blocking=True)
    drop = selector.drop_mask(layer_idx, attention, state, hidden_states, counts_t, max(counts))  # [B, N]
    dropped_positions = torch.where(drop & state.valid, state.orig_pos, -1)  # [B, N]
    index, kept = keep_index(drop | ~state.valid, new_len)  # [B, new_len]

    out = out.reshape(B, N, H * hd).gather(1, index[..., None].expand(-1, -1, H * hd))  # [B, new_len, H * hd]
    residual = residual.gather(1, index[..., None].expand(-1, -1, D))  # [B, new_len, D]
    hidden_states = residual + attn.o_proj(out)
    hidden_states = hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
    return hidden_states, index, kept, dropped_positions
