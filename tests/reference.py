"""An independent, deliberately plain FitPrune (batch 1, eager, Python lists): the method notes, literally.

It uses only the stock LLaVA model's weights and none of llava_fitprune's code, and serves as the
reference our batched/SDPA/cached implementation must reproduce token for token.
"""
from __future__ import annotations

import math

import torch
from llava.constants import IMAGE_TOKEN_INDEX


def _rope(x, pos, inv_freq):  # x: [H, n, hd], pos: [n]
    freqs = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attend(layer, h, pos, past_k=None, past_v=None):
    """h: [n, D] -> (attn output [n, D], probs [H, n, K], k, v with the past prepended)."""
    a = layer.self_attn
    n = h.shape[0]
    H, KV, hd = a.num_heads, a.num_key_value_heads, a.head_dim
    x = layer.input_layernorm(h)
    q = a.q_proj(x).view(n, H, hd).transpose(0, 1)
    k = a.k_proj(x).view(n, KV, hd).transpose(0, 1)
    v = a.v_proj(x).view(n, KV, hd).transpose(0, 1)
    q, k = _rope(q, pos, a.rotary_emb.inv_freq), _rope(k, pos, a.rotary_emb.inv_freq)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
    kk, vv = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
    K = kk.shape[1]
    scores = q @ kk.transpose(1, 2) / math.sqrt(hd)
    causal = torch.arange(K)[None, :] > (torch.arange(n)[:, None] + K - n)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return (probs @ vv).transpose(0, 1).reshape(n, H * hd), probs, k, v


@torch.no_grad()
def reference_fitprune(stock, input_ids, images, drop_per_layer, max_new_tokens):
    """Returns kept original positions after each layer, per-layer KV lengths, greedy tokens, logits."""
    lm = stock.get_model()
    image_at = int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
    *_, embeds, _ = stock.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, images)
    h = embeds[0]
    n_visual = h.shape[0] - (input_ids.shape[1] - 1)
    visual = set(range(image_at, image_at + n_visual))
    keep = list(range(h.shape[0]))
    caches, kept_after = [], []
    for layer, d in zip(lm.layers, drop_per_layer):
        out, probs, k, v = _attend(layer, h, torch.tensor(keep))
        caches.append((k, v))
        rows = list(range(len(keep)))
        if d > 0:
            M = probs.max(0).values  # [n, n] head-max
            vis = [i for i, p in enumerate(keep) if p in visual]
            last = max(keep[i] for i in vis)
            txt = [i for i, p in enumerate(keep) if p not in visual and p > last]
            self_s = M[vis][:, vis].sum(0) / len(vis)
            cross = M[txt][:, vis].sum(0)
            order = torch.argsort(self_s * cross, stable=True).tolist()
            dropped = {vis[j] for j in order[:d]}
            rows = [i for i in rows if i not in dropped]
        h = h[rows] + layer.self_attn.o_proj(out[rows])
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        keep = [keep[i] for i in rows]
        kept_after.append(list(keep))
    kv_lengths = [c[0].shape[1] for c in caches]
    logits = [stock.lm_head(lm.norm(h))[-1]]
    tokens, seen = [], len(input_ids[0]) - 1 + n_visual
    for step in range(max_new_tokens):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        h = lm.embed_tokens(torch.tensor([tok]))
        for i, layer in enumerate(lm.layers):
            out, _, k, v = _attend(layer, h, torch.tensor([seen + step]), *caches[i])
            caches[i] = (k, v)
            h = h + layer.self_attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits.append(stock.lm_head(lm.norm(h))[-1])
    return kept_after, kv_lengths, tokens, torch.stack(logits)
