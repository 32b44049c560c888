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


def load_processor(pretrained: str, model_type: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(pretrained)
    except (AttributeError, ImportError, ValueError, OSError):
        if model_type != "qwen2_5_vl":
            raise
    # Qwen2.5-VL's processor needs torchvision (its video processor): images and text without it
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return QwenImageTextProcessor(Qwen2VLImageProcessorPil.from_pretrained(pretrained),
                                  AutoTokenizer.from_pretrained(pretrained))


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
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).to(device).eval()
    enable_pruning(model)
    if pruning is not None:  # as built above: the schedule with the method's selector
        model.set_pruning(pruning.schedule, selector=pruning.selector)
    elif saved is not None:  # saved by our save_pretrained: its pruning
        model.set_pruning(saved[0], selector=saved[1])
    return model, load_processor(pretrained, config.model_type)
