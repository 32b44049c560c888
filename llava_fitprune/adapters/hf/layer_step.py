"""One transformers-5.x decoder layer (Llama, Qwen2 / Qwen2.5-VL text, Qwen3-VL text with its q/k norms)
that drops visual tokens.

The same step as the LLaVA adapter's `pruning_layer_forward` on 5.x modules: attention once, the
scores read from the rows that need them (the blocked head-max kernels of `adapters/llava/layer_step`),
the dropped tokens serve as keys and values here and stay in this layer's cache, their rows leave
before `o_proj` and the MLP. Rotary embeddings arrive as the (cos, sin) rows of the tokens present,
so kept tokens keep their original (for M-RoPE: 3-D) positions whatever the model's rope type; a
sliding-window layer masks by the original positions of its rows (window.py).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llava.layer_step import TailAttention, attention_mask_4d, attention_rows, attention_rows_head_max
from .window import window_mask_additive
from ...core.selectors import PruneState, TokenSelector, take_rows


def rotary_function(attn: nn.Module):
    """The model's own `apply_rotary_pos_emb` (from the module that defines its attention class)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def pruning_layer_forward(layer: nn.Module, layer_idx: int, hidden_states: torch.Tensor,
                          cos_sin: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor, padded: bool, cache,
                          state: PruneState, selector: TokenSelector, step, window=None, key_positions=None):
    """hidden_states: [B, N, D]; cos_sin: ([B, N, hd], [B, N, hd]); key_mask: [B, N] bool (real tokens).
    step: the plan's LayerStep (core/prefill_plan.py). A sliding layer: its `window`, and the original
    positions of its rows `key_positions` [B, N] long. Returns ([B, step.new_len, D], index
    [B, step.new_len], DropRecord); `state` follows the kept rows."""
    attn = layer.self_attn
    B, N, D = hidden_states.shape
    hd = attn.head_dim
    H, KV = attn.config.num_attention_heads, attn.config.num_key_value_heads
    if abs(attn.scaling - hd ** -0.5) > 1e-12:
        raise NotImplementedError(f"attention scaling {attn.scaling} is not 1/sqrt(head_dim): not supported by pruning layers")

    residual = hidden_states
    x = layer.input_layernorm(hidden_states)
    q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
    k = attn.k_proj(x).view(B, N, KV, hd).transpose(1, 2)  # [B, KV, N, hd]
    v = attn.v_proj(x).view(B, N, KV, hd).transpose(1, 2)  # [B, KV, N, hd]
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 (Qwen3-VL): RMSNorm over head_dim before the rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rotary_function(attn)(q, k, *cos_sin)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)  # a prefill: the layer's cache was empty
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # [B, H, N, hd]

    if window is not None:
        mask = window_mask_additive(key_mask, key_positions, window, q.dtype)  # [B, 1, N, N]
    else:
        mask = attention_mask_4d(key_mask, N, 0, q.dtype, "eager", True) if padded else None  # [B, 1, N, N]
    attention = None
    if selector.needs_attention:
        out = q.new_empty(B, N, H, hd)  # filled through a [B, H, N, hd] view
        r0 = min(state.row_start, N)
        out.transpose(1, 2)[:, :, :r0] = F.scaled_dot_product_attention(  # rows before the image
            q[:, :, :r0], k[:, :, :r0], v[:, :, :r0],
            attn_mask=None if mask is None else mask[:, :, :r0, :r0], is_causal=mask is None and r0 > 1)
        attention = TailAttention(q, k, r0, mask)  # as the LLaVA adapter's CPU path (layer_step.py there)
        if selector.reads_head_max:  # reads the head-max map only: block by block, the output with it
            attention._head_max = attention_rows_head_max(q, k, v, r0, mask, out.transpose(1, 2))
        else:
            tail, attention._probs = attention_rows(q, k, v, r0, mask)  # [B, H, R, hd], [B, H, R, N]
            out.transpose(1, 2)[:, :, r0:] = tail
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)

    state.n_visual = step.n_visual
    index, kept, record = selector.keep_rows(layer_idx, attention, state, hidden_states, step)  # [B, new_len]

    out, residual = take_rows([out.reshape(B, N, H * hd), residual], index)  # [B, new_len, .]
    hidden_states = residual + attn.o_proj(out)
    hidden_states = hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
    state.gather(index, kept, selector.tracked)
    return hidden_states, index, record
