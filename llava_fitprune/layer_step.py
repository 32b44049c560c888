"""One decoder layer that drops visual tokens, and the masks and rotary table pruning needs."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .scoring import keep_index
from .selectors import LayerAttention, PruneState, TokenSelector


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
    the scores read (visual tokens and the text after them) through an explicit softmax, once.
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
        r0 = min(state.row_start, N)
        head = F.scaled_dot_product_attention(  # rows before the image: [B, H, r0, hd]
            q[:, :, :r0], k[:, :, :r0], v[:, :, :r0],
            attn_mask=None if mask is None else mask[:, :, :r0, :r0], is_causal=mask is None and r0 > 1)
        logits = torch.matmul(q[:, :, r0:], k.transpose(2, 3)) / math.sqrt(hd)  # [B, H, R, N]
        if mask is None:
            causal = torch.arange(N, device=q.device)[None, :] > torch.arange(r0, N, device=q.device)[:, None]
            logits = logits.masked_fill(causal, torch.finfo(logits.dtype).min)
        else:
            logits = logits + mask[:, :, r0:, :]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [B, H, R, N]
        tail = torch.matmul(probs.to(v.dtype), v)  # [B, H, R, hd]
        out = torch.cat([head, tail], dim=2)  # [B, H, N, hd]
        attention = LayerAttention(probs, r0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, N, hd]

    counts = state.drop_counts[layer_idx]
    drop = selector.drop_mask(layer_idx, attention, state, hidden_states,
                              torch.tensor(counts, device=q.device), max(counts))  # [B, N]
    dropped_positions = torch.where(drop & state.valid, state.orig_pos, -1)  # [B, N]
    index, kept = keep_index(drop | ~state.valid, new_len)  # [B, new_len]

    out = out.transpose(1, 2).reshape(B, N, H * hd)
    out = out.gather(1, index[..., None].expand(-1, -1, H * hd))  # [B, new_len, H * hd]
    residual = residual.gather(1, index[..., None].expand(-1, -1, D))  # [B, new_len, D]
    hidden_states = residual + attn.o_proj(out)
    hidden_states = hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
    return hidden_states, index, kept, dropped_positions
