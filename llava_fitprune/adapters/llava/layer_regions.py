"""The compiled regions of a prefill: one decoder layer's tensor work, as pure functions of the layer,
for both backends (haotian-liu LLaVA on transformers 4.37; llava-hf, LLaVA-NeXT and Qwen2.5-VL's text
model on transformers 5.x: Llama and Qwen2 decoder layers, the same attribute names).

Each function takes the layer module and tensors and returns tensors: no cache, no plan, no host
int that changes from layer to layer, no mutation of its inputs. So `torch.compile` of one function
makes one graph that serves every layer of the model (with `inline_inbuilt_nn_modules`, torch's
default, a layer's parameters are inputs of the graph, not constants), every recipe, ratio and
method, and (with the sequence dimensions marked dynamic, fast_prefill.py) every prompt length.
What changes between layers (how many rows, which rows a pruning layer keeps) enters as data: the
sizes of the tensors and the index of the kept rows.

Four kinds (fast_prefill.CompiledPrefill compiles each once):
- `stock_step`: a layer that drops nothing;
- `pruning_attention_step`: a pruning layer up to its attention output, plus what the selector's
  scores read (the row sums of the head-max map, the map itself or the probabilities of rows
  row_start..N-1);
- `pruning_output_step`: the rows a pruning layer keeps, through `o_proj` and the MLP, and their
  rotary rows.
Between the last two, the selector's choice (a few sorts: core/selectors.py) runs eagerly, as does
every cache write: the regions return the layer's keys and values.
- `pruning_step`: a whole pruning layer, selection included, for a selector whose importance is a
  pure function of the row sums (`TokenSelector.row_sums_importance`: FitPrune, uniform) when every
  sample drops the same count: the count enters as a size (`keep`: a tensor of the kept length,
  marked dynamic), not as a constant, so one graph serves every pruning layer, ratio and recipe.

Rotary rows arrive made once per prefill ([B, N, hd]: LLaVA's table at the rows' positions; on the
transformers backend the model's own rotary embedding, for Qwen2.5-VL the M-RoPE rows with their
three sections already merged by `Qwen2_5_VLRotaryEmbedding`), so the rotation is the same
`q * cos + rotate_half(q) * sin` for every supported family; the pruning regions take the kept
tokens' rotary rows with their hidden rows, so kept tokens keep their original (3-D) positions.

Adapted from transformers==4.37.2 models/llama/modeling_llama.py LlamaDecoderLayer.forward with
LlamaSdpaAttention.forward, and transformers==5.24.0 LlamaAttention.forward / sdpa_attention_forward
(a prefill: the cache was empty). Changed: the rotary rows come gathered (above), the keys and
values are returned instead of written into a cache, and pruning layers split around the selection
(layer_step.pruning_layer_forward is the eager form of the same layer, per backend).
"""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from ...core.scoring import head_max_row_sums, keep_rows_lowest
from ...core.selectors import take_rows
from .layer_step import SCORE_ROWS_ONCE_DEVICES, tail_probs

# what a pruning attention step returns besides the output: nothing, the head-max map's row sums
# (TokenSelector.reads_row_sums), the head-max map, the probabilities
SCORES = ("none", "row_sums", "head_max", "probs")
# the score rows' sums are made in this many blocks of rows, each against the keys up to its last
# row (the causal part): about (1 + 1 / ROW_SUM_BLOCKS) / 2 of the query-key products of one piece.
# A constant, not a function of the prompt length: the blocks' size stays one symbol in the graph.
ROW_SUM_BLOCKS = 4



def _heads(attn: nn.Module) -> tuple[int, int, int, Optional[float]]:
    """(query heads, key-value heads, head dim, SDPA's scale) of an attention module of either backend:
    both keep the config; transformers 5.x states its scale (`scaling`), 4.37 uses SDPA's default (None)."""
    return (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim,
            getattr(attn, "scaling", None))


def _qkv(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x: [B, N, D] normalised; cos, sin: [B, N, hd] at the rows' positions.
    returns q [B, H, N, hd], k and v [B, KV, N, hd] (rotated)."""
    attn = layer.self_attn
    B, N, _ = x.shape
    H, KV, hd, _ = _heads(attn)
    q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, KV, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, N, KV, hd).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, N, hd]
    q = q * cos + rotate_half(q) * sin  # = apply_rotary_pos_emb with the table already gathered
    k = k * cos + rotate_half(k) * sin
    return q, k, v


def stock_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer that drops nothing, on a prefill.
    hidden: [B, N, D]; cos, sin: [B, N, hd]; mask: additive [B, 1, N, N] or None (causal, no padding).
    returns (hidden [B, N, D], k [B, KV, N, hd], v [B, KV, N, hd]): k, v for the layer's cache."""
    attn = layer.self_attn
    B, N, D = hidden.shape
    H, KV, hd, scale = _heads(attn)
    q, k, v = _qkv(layer, layer.input_layernorm(hidden), cos, sin)
    out = F.scaled_dot_product_attention(q, repeat_kv(k, H // KV), repeat_kv(v, H // KV), attn_mask=mask,
                                         is_causal=mask is None, scale=scale)  # [B, H, N, hd]
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, N, H * hd))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v


def pruning_attention_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           mask: Optional[torch.Tensor], row_start: int, scores: str,
                           weights: Optional[torch.Tensor] = None):
    """A pruning layer's attention, before the selection.
    hidden: [B, N, D]; cos, sin: [B, N, hd]; mask: additive [B, 1, N, N] or None (causal);
    row_start: the first row the scores read (the same for every layer of a prefill, < N);
    scores: one of SCORES; weights: [B, N, C] the selector's row weights (scores "row_sums").
    On SCORE_ROWS_ONCE_DEVICES (the CPU) with scores, the flash kernel's log-sum-exp gives the
    probabilities with one exp each; else SDPA and the probabilities once more.
    returns (out [B, N, H * hd] attention output before o_proj, k, v [B, KV, N, hd],
    row sums [B, C, W] (W = R from the CPU's blocks, else N) / head-max [B, R, N] / probs [B, H, R, N]
    float32 / None (R = N - row_start))."""
    attn = layer.self_attn
    B, N, D = hidden.shape
    H, KV, hd, _ = _heads(attn)
    q, k_cache, v_cache = _qkv(layer, layer.input_layernorm(hidden), cos, sin)
    out, extra = attention_and_scores(q, repeat_kv(k_cache, H // KV), repeat_kv(v_cache, H // KV), mask,
                                      row_start, scores, weights)
    return out.transpose(1, 2).reshape(B, N, H * hd), k_cache, v_cache, extra


def attention_and_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         r0: int, scores: str, weights: Optional[torch.Tensor] = None):
    """A pruning layer's attention and what its selector's scores read, after the projections (both
    backends' pruning attention steps). q, k, v: [B, H, N, hd] (k, v repeated to H heads); mask: additive
    [B, 1, N, N] or None (causal); weights: [B, N, C] (scores "row_sums"). returns (out [B, H, N, hd],
    row sums [B, C, W] (W = R on the CPU, else N) / head-max [B, R, N] / probs [B, H, R, N] float32 / None,
    R = N - r0)."""
    if scores != "none" and q.device.type in SCORE_ROWS_ONCE_DEVICES:
        # the CPU's flash kernel gives each row's log-sum-exp with the output: the score rows'
        # probabilities are then one exp per element (no softmax passes, no second P @ V)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask)  # [B, H, N, hd], [B, H, N] float32
        if scores == "row_sums":
            return out, rows_head_max_sums(q, k, r0, mask, lse[:, :, r0:], weights)
        probs = rows_probs(q, k, r0, mask, lse[:, :, r0:])
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, N, hd]
        probs = tail_probs(q, k, r0, mask) if scores != "none" else None
    if scores == "row_sums":
        return out, head_max_row_sums(probs.amax(dim=1), r0, weights)  # [B, C, N]
    return out, None if probs is None else probs.amax(dim=1) if scores == "head_max" else probs


def rows_head_max_sums(q: torch.Tensor, k: torch.Tensor, r0: int, mask: Optional[torch.Tensor],
                       lse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`head_max_row_sums` of query rows r0..N-1 from their log-sum-exp, without their [B, R, N]
    map: ROW_SUM_BLOCKS blocks of rows, each against the keys r0.. up to its last row (the columns
    before r0 are not summed; keys after a row have probability 0), the maximum over heads taken
    before the exp (exp is increasing: one exp per row and column, not per head). The rows are
    padded (zero weight) to ROW_SUM_BLOCKS blocks of `block` = R // ROW_SUM_BLOCKS + 2 rows: every
    size in the graph is a multiple of that one symbol, at least 2 (no size-1 specialisation, so
    one graph serves every length; a few padded rows cost little).
    q, k: [B, H, N, hd]; mask: additive [B, 1, N, N] or None (causal); lse: [B, H, R] float32;
    weights: [B, N, C]. returns [B, C, R] float32."""
    N, hd = q.shape[2], q.shape[3]
    R = N - r0
    block = R // ROW_SUM_BLOCKS + 2
    pad = ROW_SUM_BLOCKS * block - R  # padded rows (and keys): after every real one, zero weight
    q, k = F.pad(q[:, :, r0:], (0, 0, 0, pad)), F.pad(k[:, :, r0:], (0, 0, 0, pad))  # [B, H, Rp, hd]
    lse = F.pad(lse, (0, pad))  # [B, H, Rp]
    w = F.pad(weights[:, r0:].float().transpose(1, 2), (0, pad))  # [B, C, Rp]
    if mask is not None:
        mask = F.pad(mask[:, :, r0:, r0:].float(), (0, pad, 0, pad))  # [B, 1, Rp, Rp]
    sums = None
    for b in range(ROW_SUM_BLOCKS):
        lo, hi = b * block, (b + 1) * block  # rows lo..hi-1 (after r0) see keys < hi
        logits = torch.matmul(q[:, :, lo:hi], k[:, :, :hi].transpose(2, 3)).float() / math.sqrt(hd)
        if mask is not None:
            logits = logits + mask[:, :, lo:hi, :hi]
        best = (logits - lse[:, :, lo:hi, None]).amax(dim=1).exp()  # [B, block, hi] head-max probabilities
        future = torch.arange(hi, device=q.device)[None, :] > torch.arange(lo, hi, device=q.device)[:, None]
        best = best.masked_fill(future, 0.0)  # (with a mask too: the padded keys are in every row's future)
        part = F.pad((w[:, :, lo:hi, None] * best[:, None]).sum(dim=2), (0, (ROW_SUM_BLOCKS - b - 1) * block))
        sums = part if sums is None else sums + part  # [B, C, Rp]
    return sums[..., :R]


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


def pruning_step(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: Optional[torch.Tensor], row_start: int, weights: torch.Tensor, visual: torch.Tensor,
                 keep: torch.Tensor, importance_fn, rows: list[torch.Tensor]):
    """A whole pruning layer whose selector reads row sums: attention, the sums, the importance
    (`importance_fn`, the selector's row_sums_importance), the kept rows, o_proj and the MLP.
    hidden: [B, N, D]; cos, sin: [B, N, hd]; mask: additive [B, 1, N, N] or None; weights: [B, N, C];
    visual: [B, N] bool; keep: [n] (its size is the kept length n = N - drop, the same for every sample);
    rows: [B, N, ...] tensors that follow the kept rows (the rotary rows, the prune state's fields).
    returns (hidden [B, n, D], k, v [B, KV, N, hd], index [B, n] rows kept, order [B, N] lowest first,
    the kept rows of `rows`)."""
    out, k, v, sums = pruning_attention_step(layer, hidden, cos, sin, mask, row_start, "row_sums", weights)
    hidden, index, order, rows = select_and_output(layer, out, hidden, sums, visual, keep, importance_fn, rows)
    return hidden, k, v, index, order, rows


def select_and_output(layer: nn.Module, out: torch.Tensor, hidden: torch.Tensor, sums: torch.Tensor,
                      visual: torch.Tensor, keep: torch.Tensor, importance_fn, rows: list[torch.Tensor]):
    """The selection and the output of a pruning layer in one region (both backends' `pruning_step`).
    out: [B, N, H * hd] attention output; hidden: [B, N, D] the residual; sums: [B, C, W] row sums;
    visual: [B, N] bool; keep: [n]; rows: [B, N, ...] tensors that follow the kept rows.
    returns (hidden [B, n, D], index [B, n], order [B, N], the kept rows of `rows`)."""
    importance = importance_fn(sums, visual, None)  # [B, N], +inf off the visual tokens
    index, order = keep_rows_lowest(importance, hidden.shape[1] - keep.shape[0])  # [B, n], [B, N]
    out, hidden, *rows = take_rows([out, hidden, *rows], index)  # [B, n, .]
    return kept_output(layer, out, hidden), index, order, rows


def pruning_output_step(layer: nn.Module, out: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, index: torch.Tensor):
    """The kept rows of a pruning layer through o_proj and the MLP, and their rotary rows (both backends).
    out: [B, N, H * hd] attention output; hidden: [B, N, D] the layer's input (the residual);
    cos, sin: [B, N, hd]; index: [B, n] long rows kept.
    returns (hidden [B, n, D], cos [B, n, hd], sin [B, n, hd])."""
    out, residual, cos, sin = take_rows([out, hidden, cos, sin], index)  # [B, n, .]
    return kept_output(layer, out, residual), cos, sin


def kept_output(layer: nn.Module, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """out: [B, n, H * hd] the kept rows' attention output; residual: [B, n, D] their layer input.
    returns hidden [B, n, D] after o_proj and the MLP."""
    hidden = residual + layer.self_attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
