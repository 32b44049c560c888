"""A stand-in for `llava_fitprune.adapters.hf` while that backend (another branch) is not merged: the same
`load_pretrained` signature, dense only, on transformers' stock model, with the per-instance attributes the
plugin reads (`fitprune_last`, None: no pruned prefill; `fitprune_recipe`; `fitprune_shape`;
`fitprune_visual_mask`). `install_if_missing()` puts it in place only when the real backend cannot be
imported, so the plugin's tests run on the real one once it is there."""
from __future__ import annotations

import sys
import types

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_fitprune.core.flops import LMShape


def load_pretrained(pretrained, *, recipe=None, reduction_ratio=None, method="fitprune", device="cpu", dtype=None,
                    attn_implementation=None, **method_options):
    if recipe is not None or reduction_ratio is not None or method != "fitprune" or method_options:
        raise NotImplementedError("the stand-in backend runs dense only: merge llava_fitprune.adapters.hf")
    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype or torch.float32,
                                                        attn_implementation=attn_implementation).to(device).eval()
    image_token = model.config.image_token_id
    model.fitprune_last, model.fitprune_recipe = None, None
    model.fitprune_shape = LMShape.from_config(model.config)
    model.fitprune_visual_mask = lambda input_ids: input_ids == image_token  # [B, N] -> [B, N] bool
    return model, AutoProcessor.from_pretrained(pretrained)


def install_if_missing() -> bool:
    """Register this module as `llava_fitprune.adapters.hf` if that cannot be imported; True if it did."""
    try:
        import llava_fitprune.adapters.hf  # noqa: F401
        return False
    except ModuleNotFoundError as e:
        if e.name != "llava_fitprune.adapters.hf":
            raise
    stand_in = types.ModuleType("llava_fitprune.adapters.hf")
    stand_in.load_pretrained = load_pretrained
    sys.modules["llava_fitprune.adapters.hf"] = stand_in
    return True
