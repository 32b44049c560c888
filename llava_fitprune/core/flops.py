"""FLOPs model of the language model: pure functions of the config sizes and a token schedule.

Convention: FLOPs = 2 x multiply-accumulates of the matrix products (what
`torch.utils.flop_counter.FlopCounterMode` counts); norms, rotary, softmax and the scoring are
left out (they are well under 1% of a layer). Attention products are counted for the full
`n x n` square, as dense kernels (and FlopCounterMode) count them; `prefill_flops` can also count
what a pruning layer's blocked attention skips (the rows before the image and, per row block, the
causal keys after it), to match what runs.

At a layer `l` with `n_in` tokens entering and `n_out = n_in - d_l` leaving (FitPrune drops
after the attention), the layer costs
    q, k, v projections      2 * n_in * h * (H + 2 * KV) * hd
    QK^T and PV              2 * 2 * n_in * n_in * H * hd
    o projection             2 * n_out * H * hd * h
    gated MLP                2 * 3 * n_out * h * m
and the prefill adds the LM head over the final tokens, 2 * n_L * h * vocab.

The paper's convention ("visual_only", as in the authors' fit script) counts visual tokens only,
in MACs, per layer `3 n h^2 + 2 n^2 h + n h^2 + 3 n h m` with `n` the visual tokens left after
that layer's drop; with it the authors' published LLaVA-1.5-7B schedules reach their budgets
(0.6 -> 0.604, 0.9 -> 0.905).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class LMShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    # the config's head_dim where it is not hidden_size // num_heads (Qwen3-VL-4B: hidden 2560, 32 heads of
    # 128); None otherwise, and then left out of `to_dict` (recipes' model records stay as they were)
    explicit_head_dim: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: Any) -> "LMShape":
        """A language model's config, or a VLM's (its text config is used): a dict or a config object."""
        config = _text_config(config)
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
            lambda k, d=None: getattr(config, k, d))
        missing = [k for k in _SHAPE_KEYS if get(k) is None]
        if missing:
            raise ValueError(f"config lacks {missing}: give the full config.json of the checkpoint (or a config "
                             f"object from transformers, which fills a VLM's text-config defaults)")
        heads, head_dim = get("num_attention_heads"), get("head_dim")
        return cls(
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            vocab_size=get("vocab_size"),
            explicit_head_dim=head_dim if head_dim and head_dim != get("hidden_size") // heads else None,
        )

    def to_dict(self) -> dict[str, int]:
        out = asdict(self)
        if out["explicit_head_dim"] is None:
            del out["explicit_head_dim"]
        return out


_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _text_config(config: Any) -> Any:
    """The language model's part of a VLM config (transformers' `get_text_config`, or `text_config`);
    a plain language-model config is returned as is. A dict with the sizes at the top level (haotian-liu
    LLaVA's and Qwen2.5-VL's config.json) is a language-model config."""
    if isinstance(config, dict):
        text = config.get("text_config")
        return text if isinstance(text, dict) and "num_hidden_layers" not in config else config
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


# Language-model sizes of public checkpoints (their config.json), so that FLOPs can be printed without
# downloading anything.
NAMED_SHAPES: dict[str, LMShape] = {
    "llava-v1.5-7b": LMShape(32, 4096, 11008, 32, 32, 32000),
    "llava-v1.5-13b": LMShape(40, 5120, 13824, 40, 40, 32000),
    "llava-v1.6-vicuna-7b": LMShape(32, 4096, 11008, 32, 32, 32000),
    "llava-v1.6-mistral-7b": LMShape(32, 4096, 14336, 32, 8, 32000),
}

# llava-hf's checkpoints are haotian-liu's converted by transformers' scripts
# (models/llava/convert_llava_weights_to_hf.py, models/llava_next/convert_llava_next_weights_to_hf.py):
# the same language model, whose embedding and LM head gain two tokens (<image>, <pad>) and are padded to a
# multiple of 64 rows: `model.resize_token_embeddings(config.text_config.vocab_size + 2, pad_shape)`,
# `pad_shape = 64` (so 32000 -> 32064).
LLAVA_HF_ADDED_TOKENS = 2
LLAVA_HF_VOCAB_MULTIPLE = 64


def llava_hf_shape(original: LMShape) -> LMShape:
    """The language model of a haotian-liu LLaVA checkpoint after transformers' conversion to llava-hf."""
    rows = original.vocab_size + LLAVA_HF_ADDED_TOKENS
    return replace(original, vocab_size=-(-rows // LLAVA_HF_VOCAB_MULTIPLE) * LLAVA_HF_VOCAB_MULTIPLE)


for _hf_id, _original in [("llava-hf/llava-1.5-7b-hf", "llava-v1.5-7b"), ("llava-hf/llava-1.5-13b-hf", "llava-v1.5-13b"),
                          ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-v1.6-vicuna-7b"),
                          ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-v1.6-mistral-7b")]:
    NAMED_SHAPES[_hf_id] = llava_hf_shape(NAMED_SHAPES[_original])

# Qwen/Qwen2.5-VL-7B-Instruct's config.json keeps the language model's sizes at its top level (transformers'
# Qwen2_5_VLConfig moves them into `text_config`): num_hidden_layers 28, hidden_size 3584,
# intermediate_size 18944, num_attention_heads 28, num_key_value_heads 4 (GQA), vocab_size 152064. Written
# out here because transformers' defaults (Qwen2_5_VLTextConfig) are another size's (80 layers, hidden
# 8192); its Qwen2_5_VLVisionConfig default out_hidden_size, the LM width the 7B's merger projects to, is 3584.
NAMED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"] = LMShape(28, 3584, 18944, 28, 4, 152064)
# Qwen/Qwen3-VL-8B-Instruct's config.json, text_config: num_hidden_layers 36, hidden_size 4096,
# intermediate_size 12288, num_attention_heads 32, num_key_value_heads 8, head_dim 128 (= 4096 / 32),
# vocab_size 151936 (Qwen3VLTextConfig's defaults are another size's: 32 layers, intermediate 22016).
NAMED_SHAPES["Qwen/Qwen3-VL-8B-Instruct"] = LMShape(36, 4096, 12288, 32, 8, 151936)
# Qwen/Qwen2-VL-7B-Instruct's language model has the same sizes (Qwen2-7B's: its config.json's top level
# reads the same numbers; transformers' Qwen2VLVisionConfig default hidden_size, the width its merger
# projects to, is 3584).
NAMED_SHAPES["Qwen/Qwen2-VL-7B-Instruct"] = NAMED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"]
# llava-hf/llava-onevision-qwen2-7b-ov-hf: lmms-lab's checkpoint on Qwen/Qwen2-7B-Instruct (those sizes, 152064
# rows) converted by transformers' models/llava_onevision/convert_llava_onevision_weights_to_hf.py, which adds
# <image> and <video> and pads to a multiple of 64 rows as llava-hf's other conversions do: 152128.
NAMED_SHAPES["llava-hf/llava-onevision-qwen2-7b-ov-hf"] = llava_hf_shape(NAMED_SHAPES["Qwen/Qwen2-VL-7B-Instruct"])


def resolve_shape(config: "str | os.PathLike | dict | Any") -> LMShape:
    """A named shape, a path to a config.json (or its folder), a dict or a config object."""
    if isinstance(config, LMShape):
        return config
    if isinstance(config, (str, os.PathLike)):
        name = os.fspath(config)
        if name in NAMED_SHAPES:
            return NAMED_SHAPES[name]
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if not os.path.isfile(path):
            raise ValueError(f"config {name!r} is neither a named shape {sorted(NAMED_SHAPES)} nor a config.json")
        with open(path) as f:
            return LMShape.from_config(_complete_text_config(json.load(f), path))
    return LMShape.from_config(config)


def _complete_text_config(config: dict, path: str) -> "dict | Any":
    """transformers saves a VLM's text config as its differences from the text model's defaults (llava-hf's
    config.json names `vocab_size` but not `hidden_size`): such a dict is completed by transformers'
    config class of that model type."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a model config: a config.json is a JSON object with the model's sizes, "
                         f"this file holds a {type(config).__name__}")
    text = _text_config(config)
    if all(k in text for k in _SHAPE_KEYS):
        return text
    try:
        from transformers import AutoConfig
        return AutoConfig.for_model(**config)
    except (ImportError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: its text config names only {sorted(text)}; completing it needs a transformers "
                         f"that knows model_type {config.get('model_type')!r} ({e}); use the environment of that "
                         f"backend (.venv-hf) or a full config") from None


# -- token schedules ------------------------------------------------------------------------
def tokens_entering(num_tokens: int, drop_per_layer: Sequence[int]) -> list[int]:
    """Sequence length entering each layer, plus the final length (len = layers + 1)."""
    out = [int(num_tokens)]
    for d in drop_per_layer:
        out.append(out[-1] - int(d))
    if out[-1] < 0:
        raise ValueError(f"schedule drops {sum(drop_per_layer)} tokens from a sequence of {num_tokens}")
    return out


# -- prefill ------------------------------------------------------------------------------
def tail_attention_products(n_in: int, rows_before_image: int, block_rows: int) -> int:
    """Query-key products of a pruning layer's rows `rows_before_image`.. when they are computed in
    blocks of `block_rows` rows, each block against the keys up to its last row (`layer_step`'s
    `attention_rows_head_max`): sum over blocks [a, b) of (b - a) * b."""
    return sum((min(a + block_rows, n_in) - a) * min(a + block_rows, n_in)
               for a in range(rows_before_image, n_in, block_rows))


def layer_prefill_flops(shape: LMShape, n_in: int, n_out: int | None = None, batch: int = 1,
                        rows_before_image: int = 0, tail_block_rows: int = 0) -> int:
    """A pruning layer (n_out < n_in) computes its `rows_before_image` query rows against those
    keys only (the scores do not read them), so it skips rows * (n_in - rows) attention products.
    `tail_block_rows` > 0 also counts the causal keys its later rows skip, block by block
    (`tail_attention_products`); 0 counts those rows against every key (the convention of recipes)."""
    n_out = n_in if n_out is None else n_out
    h, m, hd, H, KV = shape.hidden_size, shape.intermediate_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
    qkv = 2 * n_in * h * (H + 2 * KV) * hd
    products = n_in * n_in
    if n_out < n_in:
        r0 = min(rows_before_image, n_in)
        tail = tail_attention_products(n_in, r0, tail_block_rows) if tail_block_rows > 0 else (n_in - r0) * n_in
        products = r0 * r0 + tail
    attn = 2 * 2 * products * H * hd
    o = 2 * n_out * H * hd * h
    mlp = 2 * 3 * n_out * h * m
    return batch * (qkv + attn + o + mlp)


def lm_head_flops(shape: LMShape, n: int, batch: int = 1) -> int:
    return batch * 2 * n * shape.hidden_size * shape.vocab_size


def prefill_flops(shape: LMShape, schedule: Sequence[int], batch: int = 1, lm_head: bool = True,
                  text_before_image: int = 0, tail_block_rows=0) -> int:
    """`schedule`: tokens entering each layer plus the final count (see `tokens_entering`).
    `text_before_image` > 0 counts the rows pruning layers skip (0: the full square, an upper bound).
    `tail_block_rows`: see `layer_prefill_flops`; an int, or a function of a layer's tokens entering."""
    block = tail_block_rows if callable(tail_block_rows) else (lambda n: tail_block_rows)
    if len(schedule) != shape.num_layers + 1:
        raise ValueError(f"schedule has {len(schedule) - 1} layers, the model {shape.num_layers}")
    total = sum(layer_prefill_flops(shape, schedule[i], schedule[i + 1], batch, text_before_image, block(schedule[i]))
                for i in range(shape.num_layers))
    return total + (lm_head_flops(shape, schedule[-1], batch) if lm_head else 0)


def dense_prefill_flops(shape: LMShape, num_tokens: int, batch: int = 1, lm_head: bool = True) -> int:
    return prefill_flops(shape, [num_tokens] * (shape.num_layers + 1), batch, lm_head)


def paper_visual_macs(shape: LMShape, visual_alive: Sequence[int]) -> int:
    """The authors' visual-only MACs; `visual_alive` as from `Recipe.visual_tokens_entering()`."""
    h, m = shape.hidden_size, shape.intermediate_size
    return sum(3 * n * h * h + 2 * n * n * h + n * h * h + 3 * n * h * m for n in visual_alive[1:])


@dataclass
class PrefillReport:
    dense_flops: int
    pruned_flops: int
    dense_visual_macs: int
    pruned_visual_macs: int
    schedule: list[int]

    @property
    def reduction(self) -> float:
        return 1.0 - self.pruned_flops / self.dense_flops

    @property
    def visual_only_reduction(self) -> float:
        return 1.0 - self.pruned_visual_macs / self.dense_visual_macs


def prefill_report(
    shape: LMShape, num_text_tokens: int, num_visual_tokens: int, drop_per_layer: Sequence[int] | None, batch: int = 1,
    text_before_image: int = 0, tail_block_rows=0,
) -> PrefillReport:
    if num_text_tokens < 0 or num_visual_tokens < 0:
        raise ValueError(f"token counts are >= 0, got {num_text_tokens} text and {num_visual_tokens} visual tokens")
    drops = list(drop_per_layer) if drop_per_layer is not None else [0] * shape.num_layers
    if len(drops) != shape.num_layers:
        raise ValueError(f"recipe has {len(drops)} layers, the model {shape.num_layers}")
    n = num_text_tokens + num_visual_tokens
    sched = tokens_entering(n, drops)
    vis = tokens_entering(num_visual_tokens, drops)
    return PrefillReport(
        dense_flops=dense_prefill_flops(shape, n, batch),
        pruned_flops=prefill_flops(shape, sched, batch, text_before_image=text_before_image,
                                   tail_block_rows=tail_block_rows),
        dense_visual_macs=paper_visual_macs(shape, [num_visual_tokens] * (shape.num_layers + 1)),
        pruned_visual_macs=paper_visual_macs(shape, vis),
        schedule=sched,
    )


def reference_text_tokens(texts: Sequence[int]) -> int:
    """The text length of the reference prompt a FLOPs budget is stated at: the mean of the prompts'
    text tokens, rounded half up."""
    if not texts:
        raise ValueError("reference_text_tokens needs at least one prompt")
    return (2 * sum(texts) + len(texts)) // (2 * len(texts))


def reduction_for(shape: LMShape, num_text_tokens: int, num_visual_tokens: int, drops: Sequence[int],
                  convention: str = "total") -> float:
    rep = prefill_report(shape, num_text_tokens, num_visual_tokens, drops)
    if convention == "total":
        return rep.reduction
    if convention == "visual_only":
        return rep.visual_only_reduction
    raise ValueError(f"unknown FLOPs convention {convention!r}: use 'total' or 'visual_only'")


# -- decoding ----------------------------------------------------------------------------------
def decode_token_flops(shape: LMShape, kv_lengths: Sequence[int], batch: int = 1) -> int:
    """FLOPs of one new token given each layer's cached length (the new token attends to it + itself)."""
    if len(kv_lengths) != shape.num_layers:
        raise ValueError(f"need {shape.num_layers} per-layer KV lengths, got {len(kv_lengths)}")
    h, m, hd, H, KV = shape.hidden_size, shape.intermediate_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
    per = 0
    for k in kv_lengths:
        per += 2 * h * (H + 2 * KV) * hd + 2 * 2 * (k + 1) * H * hd + 2 * H * hd * h + 2 * 3 * h * m
    return batch * (per + 2 * h * shape.vocab_size)


def kv_cache_bytes(shape: LMShape, kv_lengths: Sequence[int], bytes_per_element: int = 2, batch: int = 1) -> int:
    return batch * 2 * sum(kv_lengths) * shape.num_kv_heads * shape.head_dim * bytes_per_element
