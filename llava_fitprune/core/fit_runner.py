"""The layer-by-layer runner of `fit`: statistics and alpha simulations, batched over samples.

llm-awq's pattern: every sample's layer-0 inputs (`CalibrationSample.inputs_embeds`) are held,
then each decoder layer runs over all samples (in chunks of `batch_size`, right-padded) before
the next, so the schedule's per-layer mean over samples is known before the next layer runs, and
one simulation costs about one forward per sample. Attention probabilities are computed only for
the query rows the scores read (visual tokens and the text after them); the rows before the image
go through SDPA. The method itself is described in `fit.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .calibration import CalibrationError, CalibrationSample
from .flops import LMShape, reduction_for, reference_text_tokens
from .scoring import keep_index


# -- one decoder layer, batched over samples --------------------------------------------------------
def _rotate(x, cos, sin):
    """Rotary embedding with per-row tables. x: [B, H, N, hd]; cos, sin: [B, N, hd]."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def _attend(layer, hidden, valid, pos, row_start: int, rope_len: int, cos_sin=None):
    """Attention of one LlamaDecoderLayer; probabilities only for query rows row_start.. (visual + text after).

    hidden: [B, N, D]; valid: [B, N] bool; pos: [B, N] long original positions; cos_sin: None (the
    layer's own 1-D rotary table, transformers 4.37) or ([B, N, hd], [B, N, hd]) rows of the tokens
    present (transformers 5.x models, M-RoPE included)
    returns attn_out [B, N, H * hd] (before o_proj), head_max [B, R, N] float32 with R = N - row_start
    """
    attn = layer.self_attn
    if getattr(attn.config, "pretraining_tp", 1) > 1:
        raise NotImplementedError("pretraining_tp > 1 is not supported by fit")
    B, N, _ = hidden.shape
    H, KV, hd = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
    k = attn.k_proj(x).view(B, N, KV, hd).transpose(1, 2)  # [B, KV, N, hd]
    v = attn.v_proj(x).view(B, N, KV, hd).transpose(1, 2)  # [B, KV, N, hd]
    if cos_sin is None:
        cos, sin = attn.rotary_emb(v, seq_len=rope_len)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, pos)
    else:
        q, k = _rotate(q, *cos_sin), _rotate(k, *cos_sin)
    q = q * (1.0 / math.sqrt(hd))  # scaled once here, on the small tensor
    k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)  # [B, H, N, hd]
    r0 = min(row_start, N)
    parts = []
    if r0 > 0:  # rows before the image: no scores needed; samples are right-padded, so all real
        parts.append(F.scaled_dot_product_attention(q[:, :, :r0], k[:, :, :r0], v[:, :, :r0],
                                                    is_causal=True, scale=1.0))  # [B, H, r0, hd]
    rows = torch.arange(r0, N, device=q.device)  # [R]
    blocked = (torch.arange(N, device=q.device)[None, :] > rows[:, None])[None] | ~valid[:, None, :]  # [B, R, N]
    logits = torch.matmul(q[:, :, r0:], k.transpose(2, 3))  # [B, H, R, N]
    logits.masked_fill_(blocked[:, None], torch.finfo(logits.dtype).min)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [B, H, R, N]
    parts.append(torch.matmul(probs.to(v.dtype), v))  # [B, H, R, hd]
    out = torch.cat(parts, dim=2).transpose(1, 2).reshape(B, N, H * hd)  # [B, N, H * hd]
    return out, probs.amax(dim=1)


def _finish(layer, residual, attn_out):
    """o_proj + residual + MLP on the rows that stay. residual: [B, n, D], attn_out: [B, n, H * hd]."""
    h = residual + layer.self_attn.o_proj(attn_out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _scores(head_max, row_start: int, visual, text):
    """head_max: [B, R, N] -> cross, self scores [B, N] float64, zero off the visual tokens."""
    vis_rows = visual[:, row_start:].float()  # [B, R]
    txt_rows = text[:, row_start:].float()  # [B, R]
    n_v = visual.sum(-1, keepdim=True).double()  # [B, 1]
    n_t = text.sum(-1, keepdim=True).double()  # [B, 1]
    cross = torch.einsum("br,brn->bn", txt_rows, head_max).double() / n_t  # [B, N]
    self_ = torch.einsum("br,brn->bn", vis_rows, head_max).double() / torch.where(n_v > 0, n_v, 1.0)
    return cross * visual, self_ * visual


def _deletion_set(score, visual, keep_mass):
    """Longest ascending-score prefix of the visual tokens whose removal keeps >= keep_mass.

    score: [B, N] float64 (zero off visual); visual: [B, N] bool; keep_mass: [B] -> [B, N] bool
    """
    B, N = score.shape
    order = torch.sort(score.masked_fill(~visual, math.inf), dim=-1, stable=True).indices  # [B, N]
    vals = score.gather(1, order)  # [B, N], visual first, zeros after
    suffix = vals.flip(-1).cumsum(-1).flip(-1)  # suffix[:, k] = mass of sorted tokens k..N-1
    remaining = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)  # after removing k + 1
    ar = torch.arange(N, device=score.device)
    ok = (remaining >= keep_mass[:, None]) & (ar[None, :] < visual.sum(-1, keepdim=True))  # a prefix
    take = ar[None, :] < ok.sum(-1, keepdim=True)  # [B, N]
    return torch.zeros_like(visual).scatter_(1, order, take)


def _pad(rows: list[torch.Tensor], fill=0):
    """list of [n_i, ...] -> [B, max n, ...] right-padded."""
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), n, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


@dataclass
class _Rows:
    """Per-sample state between layers: lists of [n_s, D] hidden, [n_s] positions / masks."""

    hidden: list
    pos: list
    visual: list
    text: list
    rope: list  # per sample: (cos, sin) [N_s, hd] of every original position, or None

    @classmethod
    def start(cls, samples: Sequence[CalibrationSample]) -> "_Rows":
        return cls([s.inputs_embeds[0] for s in samples],
                   [torch.arange(s.num_tokens, device=s.inputs_embeds.device) for s in samples],
                   [s.visual_mask[0].bool() for s in samples], [s.text_mask[0].bool() for s in samples],
                   [None if s.rope is None else (s.rope[0][0], s.rope[1][0]) for s in samples])


def _run_layer(layer, rows: _Rows, idx: list[int], rope_len: int, keep_cross=None, keep_self=None):
    """Layer on samples `idx` (in place in `rows`). keep_*: [b] float64 masses to keep, or None (dense).

    returns cross and self mass of the alive visual tokens [b] float64, tokens dropped [b] long
    """
    hidden = _pad([rows.hidden[i] for i in idx])  # [b, N, D]
    valid = _pad([torch.ones_like(rows.pos[i], dtype=torch.bool) for i in idx], False)  # [b, N]
    pos, visual, text = (_pad([t[i] for i in idx], f) for t, f in ((rows.pos, 0), (rows.visual, False),
                                                                   (rows.text, False)))
    has_visual = visual.any(-1)
    first = torch.where(has_visual, visual.float().argmax(-1), visual.shape[1])
    r0 = int(first.min())
    cos_sin = None
    if rows.rope[idx[0]] is not None:  # kept tokens keep their positions: the rows of their original index
        cos_sin = tuple(_pad([rows.rope[i][t][rows.pos[i]] for i in idx]) for t in (0, 1))  # [b, N, hd]
    out, hm = _attend(layer, hidden, valid, pos, r0, rope_len, cos_sin)
    cross, self_ = _scores(hm, r0, visual, text)  # [b, N]
    if keep_cross is None:
        drop = torch.zeros_like(visual)
    else:
        drop = _deletion_set(cross, visual, keep_cross) & _deletion_set(self_, visual, keep_self)  # [b, N]
    kept = valid & ~drop
    index, is_kept = keep_index(~kept, int(kept.sum(-1).max()))  # [b, n]
    hidden, out = (t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in (hidden, out))
    pos, visual, text = (t.gather(1, index) for t in (pos, visual, text))  # [b, n]
    new = _finish(layer, hidden, out)  # [b, n, D]
    for j, i in enumerate(idx):
        sel = is_kept[j]
        rows.hidden[i], rows.pos[i] = new[j][sel], pos[j][sel]
        rows.visual[i], rows.text[i] = visual[j][sel], text[j][sel]
    return cross.sum(-1).cpu(), self_.sum(-1).cpu(), drop.sum(-1).cpu()


# -- statistics and simulation ------------------------------------------------------------------------
@dataclass
class Statistics:
    samples: list
    w_cross: torch.Tensor  # [S, L] float64
    w_self: torch.Tensor  # [S, L] float64
    num_visual: int  # reference visual tokens N_ref: the largest count over samples (the recipe's count)
    num_text: int  # reference text tokens: mean over samples, round half up
    shape: LMShape
    batch_size: int

    @property
    def visual_counts(self) -> list[int]:
        """Each sample's own visual-token count (anyres images differ)."""
        return [s.num_visual for s in self.samples]

    @property
    def rope_len(self) -> int:
        return max(s.num_tokens for s in self.samples)


def _layers(model):
    text_model = getattr(model, "fitprune_text_model", None)  # the transformers-native backend (adapters/hf)
    return text_model.layers if text_model is not None else model.get_model().layers


def _chunks(n: int, size: int):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


@torch.inference_mode()
def collect_statistics(model, samples: Sequence[CalibrationSample], batch_size: int = 8,
                       progress: bool = False) -> Statistics:
    from tqdm import tqdm

    if not samples:
        raise CalibrationError("the calibration set is empty: fit needs at least one sample with an image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in samples:
        if s.num_visual == 0:
            raise CalibrationError(f"sample {s.question_id!r} has no visual tokens: every calibration sample needs "
                                   f"an image")
        if not bool(s.text_mask.any()):
            raise CalibrationError(f"sample {s.question_id!r} has no text after its image: the cross score needs "
                                   f"the question after the image (build samples with llava_fitprune.adapters.llava.calibration)")
    layers, S = _layers(model), len(samples)
    rows, rope_len = _Rows.start(samples), max(s.num_tokens for s in samples)
    w_cross, w_self = torch.zeros(S, len(layers), dtype=torch.float64), torch.zeros(S, len(layers), dtype=torch.float64)
    for l, layer in enumerate(tqdm(layers, desc="fit: statistics (layers)", disable=not progress)):
        for idx in _chunks(S, batch_size):
            w_cross[idx, l], w_self[idx, l], _ = _run_layer(layer, rows, idx, rope_len)
    n_ref = max(s.num_visual for s in samples)  # the reference count: the largest in the set
    n_text = reference_text_tokens([s.num_tokens - s.num_visual for s in samples])
    return Statistics(list(samples), w_cross, w_self, n_ref, n_text,
                      getattr(model, "fitprune_shape", None) or LMShape.from_config(model.config), batch_size)


def schedule_reduction(stats: Statistics, drops: Sequence[int], convention: str) -> float:
    full = list(drops) + [0] * (stats.shape.num_layers - len(drops))
    return reduction_for(stats.shape, stats.num_text, stats.num_visual, full, convention)


def meets(stats: Statistics, drops: Sequence[int], ratio: float, convention: str) -> bool:
    return schedule_reduction(stats, drops, convention) >= ratio


@torch.inference_mode()
def simulate(model, stats: Statistics, alpha: float, stop_ratio: Optional[float] = None,
             convention: str = "total") -> list[int]:
    """Drops per layer at `alpha`, for the layers run: it stops before the first layer at which the
    schedule so far meets `stop_ratio` (None: run every layer)."""
    layers, S = _layers(model), len(stats.samples)
    rows, cum, drops = _Rows.start(stats.samples), torch.zeros(S, dtype=torch.long), []
    counts = stats.visual_counts
    for l, layer in enumerate(layers):
        if stop_ratio is not None and meets(stats, drops, stop_ratio, convention):
            break
        for idx in _chunks(S, stats.batch_size):
            keep_c, keep_s = (1.0 - alpha) * stats.w_cross[idx, l], (1.0 - alpha) * stats.w_self[idx, l]
            _, _, n = _run_layer(layer, rows, idx, stats.rope_len, keep_c.to(stats.samples[0].inputs_embeds.device),
                                 keep_s.to(stats.samples[0].inputs_embeds.device))
            cum[idx] += n
        drops.append(cumulative_reference(cum.tolist(), counts, stats.num_visual) - sum(drops))
    return drops


def cumulative_reference(cum: Sequence[int], counts: Sequence[int], n_ref: int) -> int:
    """C_l at the reference count: floor(N_ref * mean_s(cum_s / n_s) + 1/2), in exact rationals.

    Each sample's cumulative drops are a fraction of its own visual count; with one count
    (n_s = N_ref for all s) this is floor(mean_s(cum_s) + 1/2), the integer rule for one count.
    """
    frac = sum((Fraction(int(c), int(n)) for c, n in zip(cum, counts)), Fraction(0))
    return math.floor(frac * int(n_ref) / len(counts) + Fraction(1, 2))


def schedule_for(stats: Statistics, prefix: Sequence[int], ratio: float, convention: str) -> Optional[list[int]]:
    """The simulated schedule, stopped before the first layer where it meets `ratio`; None if it never does."""
    L = stats.shape.num_layers
    for l in range(len(prefix) + 1):
        if meets(stats, prefix[:l], ratio, convention):
            return list(prefix[:l]) + [0] * (L - l)
    return None


