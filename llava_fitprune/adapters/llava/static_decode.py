"""One greedy-decoding step over a StaticPrunedCache with fixed shapes: compilable and graphable.

Every sample feeds one token; layer l writes its key and value into slot `fill[l]` of its buffer
and attends over the whole buffer under the buffer's key mask (unfilled slots and padding are
False), so no shape depends on how far decoding has gone and nothing reads back to the host.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


# Adapted from transformers==4.37.2 models/llama/modeling_llama.py LlamaDecoderLayer.forward with
# LlamaSdpaAttention.forward, for q_len == 1. Changed ("# ours"): keys and values are written into a
# fixed buffer at `slot` and attention runs over the whole buffer under `key_mask`; the rotary
# table is indexed by position directly; GQA through SDPA's enable_gqa.
def decode_layer(layer: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, key_buffer: torch.Tensor,
                 value_buffer: torch.Tensor, key_mask: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """hidden: [B, 1, D]; position_ids: [B, 1]; key/value_buffer: [B, KV, C, hd]; key_mask: [B, C] bool;
    slot: [1] long; cos, sin: [P, hd] rotary tables. Returns the layer's output [B, 1, D]."""
    attn = layer.self_attn
    B = hidden.shape[0]
    H, KV, hd = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    residual = hidden
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(B, 1, H, hd).transpose(1, 2)  # [B, H, 1, hd]
    k = attn.k_proj(x).view(B, 1, KV, hd).transpose(1, 2)  # [B, KV, 1, hd]
    v = attn.v_proj(x).view(B, 1, KV, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    key_buffer.index_copy_(2, slot, k)  # ours
    value_buffer.index_copy_(2, slot, v)  # ours
    key_mask.index_fill_(1, slot, True)  # ours
    out = F.scaled_dot_product_attention(q, key_buffer, value_buffer, attn_mask=key_mask[:, None, None, :],
                                         enable_gqa=KV != H)  # [B, H, 1, hd]
    hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(B, 1, H * hd))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class StaticDecoder(nn.Module):
    """The language model's decode step over fixed buffers. Shares the model's modules (no copy).

    `layer_step` runs one layer (default `decode_layer`); the fast path's "compile" mode puts a
    `torch.compile`d `decode_layer` there: one compilation serves every layer (their parameters are
    inputs of the compiled code, their cache capacities dynamic sizes), instead of compiling all
    layers unrolled."""

    def __init__(self, causal_lm: nn.Module, layer_step=decode_layer):
        super().__init__()
        self.layer_step = layer_step
        core = causal_lm.get_model()
        self.embed_tokens = core.embed_tokens
        self.layers = core.layers
        self.norm = core.norm
        self.lm_head = causal_lm.lm_head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_buffers: list[torch.Tensor],
                value_buffers: list[torch.Tensor], key_masks: list[torch.Tensor], fill: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids: [B, 1]; fill: [L] long (each layer's next slot, advanced in place).
        Returns logits [B, 1, V] float32."""
        hidden = self.embed_tokens(input_ids)  # [B, 1, D]
        for layer_idx, layer in enumerate(self.layers):
            if key_buffers[layer_idx].shape[2] > 1:  # each layer's capacity differs (its pruned length + room):
                for t, dim in ((key_buffers[layer_idx], 2), (value_buffers[layer_idx], 2), (key_masks[layer_idx], 1)):
                    torch._dynamo.maybe_mark_dynamic(t, dim)  # a size, not a constant, of a compiled step
            hidden = self.layer_step(layer, hidden, position_ids, key_buffers[layer_idx], value_buffers[layer_idx],
                                  key_masks[layer_idx], fill[layer_idx:layer_idx + 1], cos, sin)
        fill.add_(1)
        return self.lm_head(self.norm(hidden)).float()


def rotary_tables(causal_lm: nn.Module, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, hd] from layer 0's rotary embedding (every layer's is the same), as the
    stock attention computes them (`rotary_emb(x, seq_len)`, then indexed by position)."""
    rotary = causal_lm.get_model().layers[0].self_attn.rotary_emb
    rotary = getattr(rotary, "inner", rotary)  # RopeTable (layer_step.py) wraps the stock one
    cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), seq_len=length)
    return cos, sin
