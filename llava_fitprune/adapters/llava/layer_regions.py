"""The compiled regions of a prefill: one decoder layer's tensor work, as pure functions of the layer.

Each function takes the layer module and tensors and returns tensors: no cache, no plan, no host
int that changes from layer to layer, no mutation of its inputs. So `torch.compile` of one function
makes one graph that serves every layer of the model (with `inline_inbuilt_nn_modules`, torch's
default, a layer's parameters are inputs of the graph, not constants), every recipe, ratio and
method, and (with the sequence dimensions marked dynamic, fast_prefill.py) every prompt length.
What changes between layers (how many rows, which rows a pruning layer keeps) enters as data: the
sizes of the tensors and the index of the kept rows.

Three kinds (fast_prefill.RegionalPrefill compiles each once):
- `stock_step`: a layer that drops nothing;
- `pruning_attention_step`: a pruning layer up to its attention output, plus what the selector's
  scores read (the head-max map or the probabilities of rows row_start..N-1);
- `pruning_output_step`: the rows a pruning layer keeps, through `o_proj` and the MLP.
Between the last two, the selector's choice (a few sorts: core/selectors.py) runs eagerly, as does
every cache write: the regions return the layer's keys and values.

Adapted from transformers==4.37.2 models/llama/modeling_llama.py LlamaDecoderLayer.forward with
LlamaSdpaAttention.forward (a prefill: the cache was empty). Changed: the rotary cos/sin come
gathered at the rows' positions ([B, 1, N, hd], made once per prefill stage, not per layer), the
keys and values are returned instead of written into a cache, and pruning layers split around the
selection (layer_step.pruning_layer_forward is the eager form of the same layer).
"""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from ...core.selectors import take_rows
from .layer_step import SCORE_ROWS_ONCE_DEVICES, tail_probs

# what a pruning attention step returns besides the output: nothing, the head-max map, the probabilities
SCORES = ("none", "head_max", "probs")



def _qkv(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x: [B, N, D] normalised; cos, sin: [B, 1, N, hd] at the rows' positions.
    returns q [B, H, N, hd], k and v [B, KV, N, hd] (rotated)."""
    attn = layer.self_attn
    B, N, _ = x.shape
    H, KV, hd = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, KV, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, N, KV, hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin  # = apply_rotary_pos_emb with the table already gathered
    k = k * cos + rotate_half(k) * sin
    return q, k, v


def stock_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer that drops nothing, on a prefill.
    hidden: [B, N, D]; cos, sin: [B, 1, N, hd]; mask: additive [B, 1, N, N] or None (causal, no padding).
    returns (hidden [B, N, D], k [B, KV, N, hd], v [B, KV, N, hd]): k, v for the layer's cache."""
    attn = layer.self_attn
    B, N, D = hidden.shape
    H, KV, hd = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q, k, v = _qkv(layer, layer.input_layernorm(hidden), cos, sin)
    out = F.scaled_dot_product_attention(q, repeat_kv(k, H // KV), repeat_kv(v, H // KV), attn_mask=mask,
                                         is_causal=mask is None)  # [B, H, N, hd]
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, N, H * hd))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v


def pruning_attention_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           mask: Optional[torch.Tensor], row_start: int, scores: str):
    """A pruning layer's attention, before the selection.
    hidden: [B, N, D]; cos, sin: [B, 1, N, hd]; mask: additive [B, 1, N, N] or None (causal);
    row_start: the first row the scores read (the same for every layer of a prefill, < N);
    scores: one of SCORES. On SCORE_ROWS_ONCE_DEVICES (the CPU) with scores, the flash kernel's
    log-sum-exp gives the probabilities with one exp each; else SDPA and the probabilities once more.
    returns (out [B, N, H * hd] attention output before o_proj, k, v [B, KV, N, hd],
    head-max [B, R, N] float32 / probs [B, H, R, N] float32 / None (R = N - row_start))."""
    attn = layer.self_attn
    B, N, D = hidden.shape
    H, KV, hd = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q, k_cache, v_cache = _qkv(layer, layer.input_layernorm(hidden), cos, sin)
    out, extra = attention_and_scores(q, repeat_kv(k_cache, H // KV), repeat_kv(v_cache, H // KV), mask,
                                      row_start, scores)
    return out.transpose(1, 2).reshape(B, N, H * hd), k_cache, v_cache, extra


def attention_and_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         r0: int, scores: str):
    """A pruning layer's attention and what its selector's scores read, after the projections (both
    backends' pruning attention steps). q, k, v: [B, H, N, hd] (k, v repeated to H heads); mask: additive
    [B, 1, N, N] or None (causal). returns (out [B, H, N, hd], head-max [B, R, N] float32 / probs
    [B, H, R, N] float32 / None, R = N - r0)."""
    if scores != "none" and q.device.type in SCORE_ROWS_ONCE_DEVICES:
        # the CPU's flash kernel gives each row's log-sum-exp with the output: the score rows'
        # probabilities are then one exp per element (no softmax passes, no second P @ V)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask)  # [B, H, N, hd], [B, H, N] float32
        probs = rows_probs(q, k, r0, mask, lse[:, :, r0:])
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, N, hd]
        probs = tail_probs(q, k, r0, mask) if scores != "none" else None
    return out, None if probs is None else probs.amax(dim=1) if scores == "head_max" else probs


def rows_probs(q: torch.Tensor, k: torch.Tensor, r0: int, mask: Optional[torch.Tensor],
               lse: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of query rows r0..N-1 from their log-sum-exp.
    q, k: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal); lse: [B, H, R]
    float32. returns probs [B, H, R, N] float32, 0 above the diagonal (R = N - r0)."""
    N, hd = q.shape[2], q.shape[3]
    logits = torch.matmul(q[:, :, r0:], k.transpose(2, 3)).float() / math.sqrt(hd)  # [B, H, R, N]
    if mask is not None:
        return torch.exp(logits + mask[:, :, r0:, :].float() - lse[..., None])
    future = torch.arange(N, device=q.device)[None, :] > torch.arange(r0, N, device=q.device)[:, None]  # [R, N]
    return torch.exp(logits - lse[..., None]).masked_fill(future, 0.0)


def pruning_output_step(layer: nn.Module, out: torch.Tensor, hidden: torch.Tensor,
                        index: torch.Tensor) -> torch.Tensor:
    """The kept rows of a pruning layer through o_proj and the MLP.
    out: [B, N, H * hd] attention output; hidden: [B, N, D] the layer's input (the residual);
    index: [B, n] long rows kept. returns hidden [B, n, D]."""
    out, residual = take_rows([out, hidden], index)  # [B, n, .]
    hidden = residual + layer.self_attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
