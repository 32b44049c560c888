"""An independent, deliberately plain FitPrune for transformers' VLMs (batch 1, eager, Python lists):
the method notes, literally, on the stock model's weights. None of llava_fitprune's code is used.

The stock VLM itself is run once to read what it hands its text model (the merged embeddings, e.g.
LLaVA-OneVision's anyres-max tiles, and the position ids: 1-D, or Qwen2-VL's / Qwen2.5-VL's / Qwen3-VL's 3-D
M-RoPE ids, and Qwen3-VL's DeepStack features); from there every layer is recomputed here (Qwen2's q/k/v
biases come with the projections). Qwen3-VL: q/k RMSNorms before the rotary, and after layer
l < len(DeepStack) each kept visual token's row gets the DeepStack row of its original position.
A sliding-window layer (the window the stock attention module uses) lets query i see key j only when
i - j < window in the ORIGINAL sequence, whatever was dropped; the cache here keeps every key.
"""
from __future__ import annotations

import math

import torch


def _rotate(x, cos, sin):  # x: [H, n, hd]; cos, sin: [n, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None] + rotated * sin[None]


def _window(layer):
    """The sliding window the stock attention module applies (Qwen2: its own; Mistral: its config's)."""
    a = layer.self_attn
    return getattr(a, "sliding_window", getattr(a.config, "sliding_window", None))


def _attend(layer, h, cos, sin, past_k=None, past_v=None, q_pos=None, k_pos=None):
    """h: [n, D] -> (attn output [n, H*hd], probs [H, n, K], k, v with the past prepended).
    q_pos, k_pos: original sequence positions of the queries and of all keys (for a sliding window)."""
    a, cfg = layer.self_attn, layer.self_attn.config
    n = h.shape[0]
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
    x = layer.input_layernorm(h)
    q = a.q_proj(x).view(n, H, hd).transpose(0, 1)
    k = a.k_proj(x).view(n, KV, hd).transpose(0, 1)
    v = a.v_proj(x).view(n, KV, hd).transpose(0, 1)
    if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm of q and k
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
    kk, vv = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
    K = kk.shape[1]
    scores = q @ kk.transpose(1, 2) / math.sqrt(hd)
    causal = torch.arange(K)[None, :] > (torch.arange(n)[:, None] + K - n)
    window = _window(layer)
    if window is not None:
        causal |= (torch.tensor(q_pos)[:, None] - torch.tensor(k_pos)[None, :]) >= window
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return (probs @ vv).transpose(0, 1).reshape(n, H * hd), probs, k, v


@torch.no_grad()
def reference_fitprune(stock, inputs, visual_token_id, drop_per_layer, max_new_tokens, deepstack_rows="position"):
    """inputs: processor outputs of one sample (no padding). Returns kept original positions after
    each layer, per-layer KV lengths, greedy tokens, logits of each step [T, V].
    deepstack_rows: "position" (a kept visual token gets its original position's DeepStack row) or
    "in_order" (the k kept visual rows get the first k DeepStack rows: wrong after a drop, for tests
    to show they tell the two apart)."""
    lm = stock.model.language_model
    seen = {}
    hook = lm.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        stock(**inputs)
    finally:
        hook.remove()
    h = seen["inputs_embeds"][0]  # [N, D]
    N = h.shape[0]
    pos = seen.get("position_ids")
    if pos is None:
        pos = torch.arange(N)[None]  # [1, N]
    elif pos.dim() == 3 and pos.shape[0] == 4:  # Qwen's packed layout: a text row, then the 3 M-RoPE rows
        pos = pos[1:]
    cos_all, sin_all = (t[0] for t in lm.rotary_emb(h[None], pos))  # [N, hd]
    visual = set((inputs["input_ids"][0] == visual_token_id).nonzero().flatten().tolist())
    deepstack = seen.get("deepstack_visual_embeds") or []  # per layer [V, D], rows in visual-position order
    if deepstack:
        ds_positions = seen["visual_pos_masks"][0].nonzero().flatten().tolist()
        assert set(ds_positions) == visual
        ds_row = {p: j for j, p in enumerate(ds_positions)}

    keep = list(range(N))
    caches, cache_pos, kept_after = [], [], []
    for layer_idx, (layer, d) in enumerate(zip(lm.layers, drop_per_layer)):
        out, probs, k, v = _attend(layer, h, cos_all[keep], sin_all[keep], q_pos=keep, k_pos=keep)
        caches.append((k, v))
        cache_pos.append(list(keep))
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
        if layer_idx < len(deepstack):
            kept_visual = [i for i, p in enumerate(keep) if p in visual]
            ds = [ds_row[keep[i]] for i in kept_visual] if deepstack_rows == "position" else range(len(kept_visual))
            h = h.clone()
            for i, j in zip(kept_visual, ds):
                h[i] = h[i] + deepstack[layer_idx][j]
        kept_after.append(list(keep))
    kv_lengths = [c[0].shape[1] for c in caches]
    logits = [stock.lm_head(lm.norm(h))[-1]]
    tokens, next_pos = [], int(pos.max()) + 1  # a new token's position (every M-RoPE row alike)
    for step in range(max_new_tokens):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        h = lm.embed_tokens(torch.tensor([tok]))
        p = torch.full((*pos.shape[:-1], 1), next_pos + step)
        cos, sin = (t[0] for t in lm.rotary_emb(h[None], p))
        for i, layer in enumerate(lm.layers):
            cache_pos[i].append(N + step)  # the new token's index in the sequence
            out, _, k, v = _attend(layer, h, cos, sin, *caches[i], q_pos=[N + step], k_pos=cache_pos[i])
            caches[i] = (k, v)
            h = h + layer.self_attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits.append(stock.lm_head(lm.norm(h))[-1])
    return kept_after, kv_lengths, tokens, torch.stack(logits)
