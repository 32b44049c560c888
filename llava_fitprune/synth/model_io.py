"""Load a tiny LLaVA checkpoint with LLaVA's classes, make its vision tower trainable, save it back."""
from __future__ import annotations

import copy
import os
import shutil
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters.llava.tiny import VISION_SUBDIR

SPEC_FILE = "tiny_spec.json"


def load_llava(ckpt: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """LLaVA's own `LlavaLlamaForCausalLM` on CPU, vision tower resolved against `ckpt`.

    Returns (tokenizer, model, image_processor). The config's relative `mm_vision_tower` is made
    absolute in memory only (LLaVA resolves it against the working directory otherwise).
    """
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_llama import LlavaConfig
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise FileNotFoundError(f"no LLaVA checkpoint at {ckpt!r} (config.json missing)")
    config = LlavaConfig.from_pretrained(ckpt)
    tower = os.path.join(ckpt, config.mm_vision_tower)
    if not os.path.isabs(config.mm_vision_tower) and os.path.isdir(tower):
        config.mm_vision_tower = os.path.abspath(tower)
    model = LlavaLlamaForCausalLM.from_pretrained(ckpt, config=config, torch_dtype=dtype,
                                                  attn_implementation=attn_implementation)
    vision = model.get_vision_tower()
    if not vision.is_loaded:
        vision.load_model()
    vision.to(dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, use_fast=False)
    return tokenizer, model, vision.image_processor


class GradVisionTower(nn.Module):
    """LLaVA's CLIPVisionTower.forward without its @torch.no_grad(): same features, with gradients."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, H, W) -> features (B, (H/patch)*(W/patch), vision_hidden)
        out = self.tower.vision_tower(images.to(dtype=self.tower.dtype), output_hidden_states=True)
        return self.tower.feature_select(out).to(images.dtype)


@contextmanager
def trainable_vision_tower(model):
    """Within the block, `model` (this instance only) back-propagates into its CLIP vision tower."""
    inner = model.get_model()
    tower = inner.vision_tower
    if not getattr(tower, "is_loaded", False):
        raise RuntimeError("load the vision tower (vision_tower.load_model()) before training it")
    tower.vision_tower.requires_grad_(True)
    inner.vision_tower = GradVisionTower(tower)
    try:
        yield tower
    finally:
        inner.vision_tower = tower


def save_llava(model, tokenizer, out_dir: str, dtype: torch.dtype, spec_from: str | None = None) -> str:
    """Write the checkpoint layout `tiny.build_tiny_llava` writes: LLaVA weights + `vision_tower/` in `dtype`."""
    inner = model.get_model()
    tower = inner.vision_tower
    if isinstance(tower, GradVisionTower):
        raise RuntimeError("save outside the trainable_vision_tower block")
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if not k.startswith("model.vision_tower.")}  # the tower goes to its own folder
    config = copy.deepcopy(model.config)
    config.mm_vision_tower = VISION_SUBDIR
    config.torch_dtype = dtype
    config.use_cache = True
    config.save_pretrained(out_dir)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    config.save_pretrained(out_dir)  # save_pretrained wrote the in-memory config; keep the relative one
    copy.deepcopy(tower.vision_tower).to(dtype).save_pretrained(os.path.join(out_dir, VISION_SUBDIR),
                                                               safe_serialization=True)
    tower.image_processor.save_pretrained(os.path.join(out_dir, VISION_SUBDIR))
    tokenizer.save_pretrained(out_dir)
    if spec_from is not None and os.path.isfile(os.path.join(spec_from, SPEC_FILE)):
        shutil.copy(os.path.join(spec_from, SPEC_FILE), os.path.join(out_dir, SPEC_FILE))
    return out_dir
