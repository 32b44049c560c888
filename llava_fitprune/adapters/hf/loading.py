"""`load_pretrained`: a transformers VLM by hub id or local path, with pruning on that instance."""
from __future__ import annotations

from typing import Optional

import torch

from .llava import LlavaPruningMixin
from .load_args import check_attn_implementation, check_device, check_dtype, check_pruning
from .model import attach
from .qwen2_5_vl import QwenImageTextProcessor, QwenPruningMixin, QwenTextPruningMixin
from ...core.recipe import Recipe
from ...core.saved_method import selector_from_config

# model_type of the config -> (VLM mixin, text-model mixin); the text mixin None: the generic loop
MODEL_TYPES = {
    "llava": (LlavaPruningMixin, None),
    "llava_next": (LlavaPruningMixin, None),
    "qwen2_5_vl": (QwenPruningMixin, QwenTextPruningMixin),
}


def enable_pruning(model: torch.nn.Module) -> torch.nn.Module:
    """Give a loaded stock model (one of MODEL_TYPES) `set_pruning` and `fitprune_last`; dense until set."""
    from .decoder import PruningTextModelMixin

    model_type = model.config.model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model type {model_type!r} is not supported by the transformers backend; "
                         f"supported: {sorted(MODEL_TYPES)}")
    vlm, text = MODEL_TYPES[model_type]
    return attach(model, vlm, text or PruningTextModelMixin)


# image tokens a vision tower adds to its patches (CLIP: the class token), for processors saved without them
TOWER_EXTRA_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def fill_legacy_llava_processor(processor, config, pretrained: str):
    """A LLaVA / LLaVA-NeXT processor saved by transformers 4.37 has no patch_size (5.x then fails with a
    TypeError on the first image): fill patch_size, vision_feature_select_strategy and
    num_additional_image_tokens from the model config, on this instance, or fail with one line."""
    if getattr(processor, "patch_size", 0) is not None:
        return processor
    vision = config.vision_config
    extra = TOWER_EXTRA_TOKENS.get(vision.model_type)
    if extra is None or getattr(vision, "patch_size", None) is None:
        raise ValueError(f"{pretrained}: its processor (saved by an older transformers) has no patch_size, and a "
                         f"{vision.model_type!r} vision tower's cannot be inferred: add patch_size, "
                         f"vision_feature_select_strategy and num_additional_image_tokens to its processor_config.json")
    processor.patch_size = vision.patch_size
    processor.vision_feature_select_strategy = (getattr(processor, "vision_feature_select_strategy", None)
                                                or config.vision_feature_select_strategy)
    processor.num_additional_image_tokens = extra
    return processor


def load_processor(pretrained: str, model_type: str, config=None):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(pretrained)
    except (AttributeError, ImportError, ValueError, OSError):
        if model_type != "qwen2_5_vl":
            raise
    else:
        if model_type in ("llava", "llava_next") and config is not None:
            processor = fill_legacy_llava_processor(processor, config, pretrained)
        return processor
    # Qwen2.5-VL's processor needs torchvision (its video processor): images and text without it
    return QwenImageTextProcessor.from_pretrained(pretrained)


def load_pretrained(pretrained: str, *, recipe=None, reduction_ratio: Optional[float] = None,
                    method: str = "fitprune", device: str = "cpu", dtype=None,
                    attn_implementation: Optional[str] = None, **method_options):
    """(model, processor). See the package docstring (`llava_fitprune.adapters.hf`). Every argument is
    checked (load_args.py) before the weights load."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    dtype, device = check_dtype(dtype), check_device(device)
    check_attn_implementation(attn_implementation)
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as e:
        raise ValueError(f"pretrained {pretrained!r}: cannot read its config (give a local checkpoint folder or a hub id): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"{pretrained}: model type {config.model_type!r} is not supported by the transformers "
                         f"backend; supported: {sorted(MODEL_TYPES)}")
    pruning = check_pruning(config, recipe, reduction_ratio, method, method_options, attn_implementation)
    saved = None  # (recipe, selector) a checkpoint saved by our save_pretrained records, checked before the weights
    if pruning is None and getattr(config, "fitprune_recipe", None) is not None:
        saved = (Recipe.from_dict(config.fitprune_recipe, source=f"{pretrained} config.fitprune_recipe"),
                 selector_from_config(getattr(config, "fitprune_method", None) or "fitprune",
                                      getattr(config, "fitprune_method_options", None)))
    processor = load_processor(pretrained, config.model_type, config)  # before the weights: its errors too
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).to(device).eval()
    enable_pruning(model)
    if pruning is not None:  # as built above: the schedule with the method's selector
        model.set_pruning(pruning.schedule, selector=pruning.selector)
    elif saved is not None:  # saved by our save_pretrained: its pruning
        model.set_pruning(saved[0], selector=saved[1])
    return model, processor
