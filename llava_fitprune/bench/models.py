"""What `llava-fitprune bench` runs: a language model without a vision tower, prompts, and row specs.

Only the language model matters for pruning cost, so the model is a `FitPruneLlavaLlamaForCausalLM`
built from a config with no `mm_vision_tower`, fed `inputs_embeds` and a `visual_mask` directly.
A named shape (`NAMED_SHAPES`) gets random weights; a checkpoint path gets its own weights unless
the width is scaled. Scaling the width keeps depth, head size, token counts and the MLP/hidden
ratio, so a 7B-shaped model fits a CPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.flops import NAMED_SHAPES, LMShape, decode_token_flops, dense_prefill_flops, prefill_flops, tokens_entering
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the prompt layouts and row specs serve .venv-hf's bench too
    from ..adapters.llava.modeling import FitPruneLlavaLlamaForCausalLM
from ..core.recipe import Recipe

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
FAST = "-fast"  # suffix of a row on the fast path
FAST_METHODS = ("dense", "fitprune", "oracle")  # the rows --compile repeats on the fast path
_LLAVA_ONLY_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size", "fitprune_recipe")


def available_attn_implementations(device: str) -> list[str]:
    """eager and sdpa always; flash_attention_2 when `flash_attn` imports and the device is CUDA."""
    out = ["eager", "sdpa"]
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attention_2")
    return out


def _shape_config(shape: LMShape) -> dict:
    return dict(
        num_hidden_layers=shape.num_layers, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
    )


def scale_width(cfg: dict, width: int, heads: Optional[int] = None) -> dict:
    """Scale hidden size to `width`; the MLP keeps its ratio, heads keep their size unless `heads` is given."""
    h, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    if heads is None:
        head_dim = h // H
        if width % head_dim:
            raise ValueError(f"--width {width} is not a multiple of the head size {head_dim}: pass --heads")
        heads = width // head_dim
    if width % heads:
        raise ValueError(f"--width {width} is not divisible by --heads {heads}")
    kv = max(1, heads * KV // H)
    return {**cfg, "hidden_size": width, "num_attention_heads": heads, "num_key_value_heads": kv,
            "intermediate_size": round(cfg["intermediate_size"] * width / h)}


def load_lm_config(model: str, width: Optional[int] = None, heads: Optional[int] = None) -> tuple[dict, bool]:
    """(config dict of the language model, whether checkpoint weights can be loaded)."""
    if model in NAMED_SHAPES:
        cfg, has_weights = _shape_config(NAMED_SHAPES[model]), False
    else:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise ValueError(f"--model {model}: neither a named config nor a checkpoint folder or config.json: "
                             f"pass one of {sorted(NAMED_SHAPES)} or a path that exists")
        with open(path) as f:
            cfg = json.load(f)
        has_weights = os.path.isdir(model)
    cfg = {k: v for k, v in cfg.items() if k not in _LLAVA_ONLY_KEYS}
    if width is not None and width != cfg["hidden_size"]:
        cfg, has_weights = scale_width(cfg, width, heads), False
    return cfg, has_weights


def build_lm(model: str, cfg: dict, has_weights: bool, attn: str, dtype: torch.dtype, device: str,
             seed: int = 0) -> FitPruneLlavaLlamaForCausalLM:
    """The pruning-aware causal LM for `cfg` with `attn` attention, in eval mode on `device`."""
    from ..adapters.llava.modeling import FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM

    config = FitPruneLlavaConfig(**cfg)
    config._attn_implementation = attn
    config.use_cache = True
    if has_weights:
        lm = FitPruneLlavaLlamaForCausalLM.from_pretrained(model, config=config, torch_dtype=dtype,
                                                           attn_implementation=attn, low_cpu_mem_usage=True)
    else:
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of a large model
        try:
            with torch.device(device):  # and on the target device: a 7B random init on CPU takes minutes
                lm = FitPruneLlavaLlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    return lm.to(device).eval()


def build_stock_lm(lm: FitPruneLlavaLlamaForCausalLM, attn: str):
    """LLaVA's own `LlavaLlamaForCausalLM` with `lm`'s config and weights: the model a user runs today."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    config = LlavaConfig(**{k: v for k, v in lm.config.to_dict().items() if k not in _LLAVA_ONLY_KEYS})
    config._attn_implementation = attn
    config.use_cache = True
    dtype, device = lm.dtype, lm.device
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            stock = LlavaLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    stock.load_state_dict(lm.state_dict())
    return stock.eval()


@dataclass(frozen=True)
class PromptLayout:
    prompt_tokens: int  # text before the image
    visual_tokens: int
    text_tokens: int  # text after the image

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.visual_tokens + self.text_tokens

    def with_visual(self, visual_tokens: int) -> "PromptLayout":
        return PromptLayout(self.prompt_tokens, visual_tokens, self.text_tokens)


def make_inputs(lm: FitPruneLlavaLlamaForCausalLM, layout: PromptLayout, batch: int, seed: int = 0):
    """Random embeddings with the embedding table's spread: ([B, N, D], visual_mask [B, N] bool)."""
    emb = lm.get_model().embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layout.total, emb.shape[1], generator=gen) * emb.float().std().item()
    visual = torch.zeros(batch, layout.total, dtype=torch.bool)
    visual[:, layout.prompt_tokens: layout.prompt_tokens + layout.visual_tokens] = True
    return x.to(device=emb.device, dtype=emb.dtype), visual.to(emb.device)


@dataclass
class RowSpec:
    """One benchmark row: a method at a ratio, with its token schedule and FLOPs."""

    method: str  # stock | dense | fitprune | oracle | prellm, "-fast" on the fast path (fast_path.py)
    ratio: float  # reduction_ratio of the recipe (0 for dense)
    layout: PromptLayout
    recipe: Optional[Recipe] = None  # fitprune and oracle
    schedule: list[int] = field(default_factory=list)  # tokens entering each layer + final
    prefill_flops: int = 0
    decode_flops: float = 0.0  # mean per new token over the decoded tokens
    flops_reduction: float = 0.0  # 1 - prefill FLOPs / the dense model's on the full prompt

    @property
    def kv_lengths(self) -> list[int]:
        return self.schedule[:-1]

    @property
    def base(self) -> str:
        """The method without the fast-path suffix."""
        return self.method.removesuffix(FAST)

    @property
    def fast(self) -> bool:
        return self.method.endswith(FAST)


def _decode_flops(shape: LMShape, kv: list[int], batch: int, new_tokens: int) -> float:
    steps = max(new_tokens - 1, 1)  # the first new token comes from the prefill's logits
    return sum(decode_token_flops(shape, [k + s for k in kv], batch) for s in range(steps)) / steps


def row_specs(shape: LMShape, layout: PromptLayout, recipes: list[Recipe], methods: list[str], batch: int,
              new_tokens: int, fast: bool = False) -> list[RowSpec]:
    """Stock LLaVA and dense first, then per recipe: fitprune, oracle and the pre-LLM baseline (equal
    average tokens); `fast`: dense, fitprune and oracle also on the fast path."""
    methods = [m for m in methods for m in ((m, m + FAST) if fast and m in FAST_METHODS else (m,))]
    L, N, V = shape.num_layers, layout.total, layout.visual_tokens
    dense_sched = [N] * (L + 1)
    dense = dense_prefill_flops(shape, N, batch)
    rows = []
    for method in ("stock", "dense", "dense" + FAST):
        if method in methods:
            rows.append(RowSpec(method, 0.0, layout, None, dense_sched, dense,
                                _decode_flops(shape, dense_sched[:-1], batch, new_tokens)))
    for r in recipes:
        ratio = r.reduction_ratio if r.reduction_ratio is not None else float("nan")
        sched = tokens_entering(N, r.drops_for(V))
        for method in ("fitprune", "fitprune" + FAST, "oracle", "oracle" + FAST):
            if method in methods:
                rows.append(RowSpec(method, ratio, layout, r, sched, prefill_flops(shape, sched, batch),
                                    _decode_flops(shape, sched[:-1], batch, new_tokens)))
        if "prellm" in methods:
            alive = r.visual_tokens_entering(V)[:-1]
            fewer = layout.with_visual(round(sum(alive) / len(alive)))  # same average tokens over layers
            s = [fewer.total] * (L + 1)
            rows.append(RowSpec("prellm", ratio, fewer, None, s, dense_prefill_flops(shape, fewer.total, batch),
                                _decode_flops(shape, s[:-1], batch, new_tokens)))
    for r in rows:
        r.flops_reduction = 1 - r.prefill_flops / dense
    return rows
