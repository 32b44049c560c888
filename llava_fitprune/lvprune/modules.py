"""LVPruning's modules: small cross-attention blocks that score each vision token against the prompt.

A module at decoder layer `l` reads that layer's input hidden states. Vision tokens are the
queries, the prompt's text tokens the keys and values; from [query, attended text] an MLP
predicts one keep logit per vision token. Its drops take effect after layer `l`'s attention (the
harness's convention: a recipe drop at layer `l`), so the schedule is a `Recipe`.

The modules are their own small file pair (`lvprune_modules.safetensors` + `lvprune_config.json`),
never registered inside the LLaVA model: attaching or removing them leaves its weights untouched.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import atomic
from ..core.recipe import Recipe
from ..core.scoring import keep_index

LVPRUNE_FORMAT = "llava-fitprune.lvprune-modules"
LVPRUNE_VERSION = 1
CONFIG_NAME = "lvprune_config.json"
WEIGHTS_NAME = "lvprune_modules.safetensors"

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder depth, which the default layers are written for
REFERENCE_LAYERS = (2, 8, 16)  # a few layers up to the middle
DEFAULT_KEEP = (0.5, 0.25, 0.1)  # fraction of the image's visual tokens alive after each module
DEFAULT_WIDTH = 256
DEFAULT_HEADS = 4
DEFAULT_TEMPERATURE = 1.0
INIT_STD = 0.02
INIT_KEEP_MARGIN = 1e-3  # an initial keep probability stays this far inside (0, 1): its logit is finite


def default_schedule(num_layers: int) -> tuple[list[int], list[float]]:
    """REFERENCE_LAYERS scaled to `num_layers` (duplicates merged, keeping the later keep)."""
    chosen: dict[int, float] = {}
    for layer, keep in zip(REFERENCE_LAYERS, DEFAULT_KEEP):
        chosen[min(num_layers - 1, round(layer * num_layers / REFERENCE_DEPTH))] = keep
    layers = sorted(chosen)
    return layers, [chosen[l] for l in layers]


@dataclass
class LVPruneConfig:
    hidden_size: int  # the language model's
    num_layers: int  # decoder layers of the model the modules are for
    layers: list[int] = field(default_factory=list)  # where modules sit (empty: default_schedule)
    keep: list[float] = field(default_factory=list)  # cumulative keep fraction after each module
    width: int = DEFAULT_WIDTH
    heads: int = DEFAULT_HEADS
    temperature: float = DEFAULT_TEMPERATURE  # Gumbel-softmax temperature (training only)
    model: dict[str, Any] = field(default_factory=dict)  # identity of the base model (informational)

    def __post_init__(self):
        if not self.layers:
            self.layers, self.keep = default_schedule(self.num_layers)
        self.layers, self.keep = [int(l) for l in self.layers], [float(k) for k in self.keep]
        if len(self.layers) != len(self.keep):
            raise ValueError(f"{len(self.layers)} module layers but {len(self.keep)} keep fractions")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or not all(0 <= l < self.num_layers for l in self.layers):
            raise ValueError(f"module layers {self.layers} must increase within [0, {self.num_layers})")
        if any(not (0 < k <= 1) for k in self.keep) or any(b > a for a, b in zip(self.keep, self.keep[1:])):
            raise ValueError(f"keep fractions {self.keep} must lie in (0, 1] and not increase")
        if self.width % self.heads:
            raise ValueError(f"module width {self.width} is not divisible by heads {self.heads}")

    def step_keep(self, i: int) -> float:
        """Fraction of the tokens alive before module i that it keeps."""
        return self.keep[i] / (self.keep[i - 1] if i else 1.0)

    def recipe(self, num_visual_tokens: int) -> Recipe:
        """The schedule: round(keep * n) visual tokens alive after each module layer."""
        drops, alive = [0] * self.num_layers, num_visual_tokens
        for layer, keep in zip(self.layers, self.keep):
            after = math.floor(keep * num_visual_tokens + 0.5)
            drops[layer], alive = alive - after, after
        return Recipe(drops, num_visual_tokens, method="lvprune", model=dict(self.model),
                      provenance={"lvprune_layers": self.layers, "lvprune_keep": self.keep})

    def to_dict(self) -> dict[str, Any]:
        return {"format": LVPRUNE_FORMAT, "version": LVPRUNE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "LVPruneConfig":
        if d.get("format") != LVPRUNE_FORMAT:
            raise ValueError(f"{source}: not LVPruning modules (format {d.get('format')!r}, expected {LVPRUNE_FORMAT!r})")
        if d.get("version") != LVPRUNE_VERSION:
            raise ValueError(f"{source}: LVPruning modules version {d.get('version')!r} unsupported (reads {LVPRUNE_VERSION})")
        return cls(**{k: v for k, v in d.items() if k not in ("format", "version")})


def gather_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask: [B, N] bool -> (index [B, M], ok [B, M]): the marked positions, left-filled per sample."""
    return keep_index(~mask, max(int(mask.sum(-1).max()), 1))


class LVPruneModule(nn.Module):
    def __init__(self, hidden_size: int, width: int, heads: int, init_keep: float = 0.5):
        super().__init__()
        self.heads = heads
        # Every tensor is initialised below, in fp32 whatever the default dtype, and the same whether or
        # not LLaVA's disable_torch_init() has stubbed Linear/LayerNorm.reset_parameters in this process.
        linear = lambda i, o: nn.utils.skip_init(nn.Linear, i, o, dtype=torch.float32)
        self.norm = nn.utils.skip_init(nn.LayerNorm, hidden_size, dtype=torch.float32)  # LLaMA's outlier channels
        self.q = linear(hidden_size, width)
        self.k = linear(hidden_size, width)
        self.v = linear(hidden_size, width)
        self.o = linear(width, width)
        self.score = nn.Sequential(linear(2 * width, width), nn.GELU(), linear(width, 1))
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        for lin in (self.q, self.k, self.v, self.o, self.score[0], self.score[2]):
            nn.init.normal_(lin.weight, std=INIT_STD)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(self.score[2].bias, math.log(init_keep / (1 - init_keep)))  # start near init_keep

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, M, w] -> [B, h, M, w / h]
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """hidden: [B, N, D]; visual, text: [B, N] bool -> keep logits [B, N] float32 (0 off `visual`)."""
        B, N, D = hidden.shape
        dtype = self.q.weight.dtype
        vi, v_ok = gather_rows(visual)  # [B, V]
        ti, t_ok = gather_rows(text)  # [B, T]
        xv = self.norm(hidden.gather(1, vi[..., None].expand(-1, -1, D)).to(dtype))  # [B, V, D]
        xt = self.norm(hidden.gather(1, ti[..., None].expand(-1, -1, D)).to(dtype))  # [B, T, D]
        q = self.q(xv)  # [B, V, w]
        has_text = t_ok.any(-1, keepdim=True)  # [B, 1]: a sample without text attends to nothing
        key_ok = (t_ok | ~has_text)[:, None, None, :]  # [B, 1, 1, T]
        ctx = F.scaled_dot_product_attention(self._heads(q), self._heads(self.k(xt)), self._heads(self.v(xt)),
                                             attn_mask=key_ok)  # [B, h, V, w / h]
        ctx = ctx.transpose(1, 2).reshape(B, -1, q.shape[-1]) * has_text[..., None]  # [B, V, w]
        logits = self.score(torch.cat([q, self.o(ctx)], dim=-1)).squeeze(-1).float()  # [B, V]
        out = torch.zeros(B, N, dtype=torch.float32, device=hidden.device)
        return out.scatter(1, vi, logits.masked_fill(~v_ok, 0.0)).masked_fill(~visual, 0.0)


class LVPruneModules(nn.Module):
    """The modules of one model, keyed by decoder layer."""

    def __init__(self, config: LVPruneConfig, init_keep: "float | list[float] | None" = None):
        """`init_keep`: each module's initial keep probability (None: its target step ratio)."""
        super().__init__()
        self.config = config
        n = len(config.layers)
        init = [config.step_keep(i) for i in range(n)] if init_keep is None else (
            [float(init_keep)] * n if isinstance(init_keep, (int, float)) else list(init_keep))
        clamp = lambda k: min(max(k, INIT_KEEP_MARGIN), 1 - INIT_KEEP_MARGIN)
        self.blocks = nn.ModuleDict({
            str(l): LVPruneModule(config.hidden_size, config.width, config.heads, clamp(k))
            for l, k in zip(config.layers, init)})

    def has(self, layer_idx: int) -> bool:
        return str(layer_idx) in self.blocks

    def at(self, layer_idx: int) -> LVPruneModule:
        if not self.has(layer_idx):
            raise KeyError(f"no LVPruning module at layer {layer_idx} (modules at {self.config.layers}): "
                           f"the recipe must drop only at module layers")
        return self.blocks[str(layer_idx)]

    def save(self, out_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic.atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:  # each file whole or not at all
            save_file(tensors, tmp, metadata={"format": LVPRUNE_FORMAT})
        atomic.write_json(os.path.join(out_dir, CONFIG_NAME), self.config.to_dict(), newline=False)

    @classmethod
    def load(cls, path: str, device="cpu") -> "LVPruneModules":
        """`path`: a folder with the two files (or the path of either file)."""
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        cfg_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not saved LVPruning modules")
        from safetensors.torch import load_file

        with open(cfg_path) as f:
            modules = cls(LVPruneConfig.from_dict(json.load(f), source=cfg_path))
        modules.load_state_dict(load_file(os.path.join(folder, WEIGHTS_NAME)))
        return modules.to(device)
