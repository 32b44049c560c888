"""The compiled regions of a transformers-5.x prefill: one decoder layer's tensor work, as pure
functions of the layer (Llama: llava-hf, LLaVA-NeXT; Qwen2 / Qwen2.5-VL's text model).

The transformers backend's port of adapters/llava/layer_regions.py (same four kinds, same rules:
the layer's parameters are graph inputs, so one graph serves every layer; what differs between
layers, recipes and methods enters as data, i.e. tensor sizes and the index of the kept rows; no
cache, plan or selector inside):
- `stock_step`: a layer that drops nothing;
- `pruning_step`: a whole pruning layer, selection included (FitPrune, uniform; the LLaVA backend's
  `select_and_output` after this backend's attention step);
- `pruning_attention_step`: a pruning layer up to its attention output, plus what the selector's
  scores read (the head-max map's row sums, the map or the probabilities of rows row_start..N-1);
- `pruning_output_step` (the LLaVA backend's, the same layer attributes): the rows a pruning layer
  keeps, through `o_proj` and the MLP, and the rotary (cos, sin) rows of those tokens.
Rotary rows arrive as the model's own rotary embedding made them once per prefill ([B, N, hd]:
for Qwen2.5-VL the M-RoPE rows, its three sections already merged by `Qwen2_5_VLRotaryEmbedding`),
so the rotation is the same `q * cos + rotate_half(q) * sin` for every supported family. The output
region gathers the kept tokens' cos/sin rows with their hidden rows (one index for all four), so
kept tokens keep their original (3-D) positions and no eager gather runs between layers.

Adapted from transformers==5.24.0 models/llama/modeling_llama.py LlamaDecoderLayer.forward with
LlamaAttention.forward / sdpa_attention_forward (a prefill: the cache was empty). Changed: the keys
and values are returned instead of written into a cache; pruning layers split around the selection
(layer_step.pruning_layer_forward is the eager form of the same layer).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from ..llava.layer_regions import attention_and_scores, pruning_output_step, select_and_output  # noqa: F401 (a region)
from ...core.selectors import take_rows


def _qkv(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x: [B, N, D] normalised; cos, sin: [B, N, hd] rows of the tokens present.
    returns q [B, H, N, hd], k and v [B, KV, N, hd] (rotated)."""
    attn = layer.self_attn
    B, N, _ = x.shape
    H, KV, hd = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, KV, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, N, KV, hd).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, N, hd]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v  # = apply_rotary_pos_emb


def stock_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer that drops nothing, on a prefill.
    hidden: [B, N, D]; cos, sin: [B, N, hd]; mask: additive [B, 1, N, N] or None (causal, no padding).
    returns (hidden [B, N, D], k [B, KV, N, hd], v [B, KV, N, hd]): k, v for the layer's cache."""
    attn = layer.self_attn
    B, N, D = hidden.shape
    H, KV = attn.config.num_attention_heads, attn.config.num_key_value_heads
    q, k, v = _qkv(layer, layer.input_layernorm(hidden), cos, sin)
    out = F.scaled_dot_product_attention(q, repeat_kv(k, H // KV), repeat_kv(v, H // KV), attn_mask=mask,
                                         is_causal=mask is None, scale=attn.scaling)  # [B, H, N, hd]
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, N, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v


def pruning_attention_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           mask: Optional[torch.Tensor], row_start: int, scores: str,
                           weights: Optional[torch.Tensor] = None):
    """A pruning layer's attention, before the selection.
    hidden: [B, N, D]; cos, sin: [B, N, hd]; mask: additive [B, 1, N, N] or None (causal);
    row_start: the first row the scores read (< N); scores: none / row_sums / head_max / probs
    (adapters/llava/layer_regions.SCORES); weights: [B, N, C] the selector's row weights (row_sums).
    On SCORE_ROWS_ONCE_DEVICES (the CPU) with scores, the flash kernel's log-sum-exp gives the
    probabilities with one exp each; else SDPA and the probabilities once more. returns (out
    [B, N, H * hd] before o_proj, k, v [B, KV, N, hd], row sums [B, C, W] / head-max [B, R, N] /
    probs [B, H, R, N] float32 / None (R = N - row_start))."""
    attn = layer.self_attn
    B, N, D = hidden.shape
    H, KV = attn.config.num_attention_heads, attn.config.num_key_value_heads
    q, k_cache, v_cache = _qkv(layer, layer.input_layernorm(hidden), cos, sin)
    out, extra = attention_and_scores(q, repeat_kv(k_cache, H // KV), repeat_kv(v_cache, H // KV), mask,
                                      row_start, scores, weights)  # out: [B, H, N, hd]
    return out.transpose(1, 2).reshape(B, N, -1), k_cache, v_cache, extra


def pruning_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: Optional[torch.Tensor], row_start: int, weights: torch.Tensor, visual: torch.Tensor,
                 keep: torch.Tensor, importance_fn, rows: list[torch.Tensor]):
    """A whole pruning layer whose selector reads row sums (adapters/llava/layer_regions.pruning_step):
    hidden: [B, N, D]; cos, sin: [B, N, hd]; weights: [B, N, C]; visual: [B, N] bool; keep: [n], n = N - drop;
    rows: [B, N, ...] tensors that follow the kept rows (the rotary rows among them).
    returns (hidden [B, n, D], k, v [B, KV, N, hd], index [B, n], order [B, N], the kept rows of `rows`)."""
    out, k, v, sums = pruning_attention_step(layer, hidden, cos, sin, mask, row_start, "row_sums", weights)
    hidden, index, order, rows = select_and_output(layer, out, hidden, sums, visual, keep, importance_fn, rows)
    return hidden, k, v, index, order, rows
