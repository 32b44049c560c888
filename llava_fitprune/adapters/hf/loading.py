"""`load_pretrained`: a transformers VLM by hub id or local path, with pruning on that instance."""
from __future__ import annotations

from typing import Optional

import torch

from .fast_prefill import COMPILED_MODEL_TYPES, enable_fast_path
from .llava import LlavaPruningMixin
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
                    attn_implementation: Optional[str] = None, compile: bool = False, **method_options):
    """(model, processor). See the package docstring (`llava_fitprune.adapters.hf`)."""
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r}: give True or False")
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(pretrained)
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"{pretrained}: model type {config.model_type!r} is not supported by the transformers "
                         f"backend; supported: {sorted(MODEL_TYPES)}")
    if compile and config.model_type not in COMPILED_MODEL_TYPES:
        raise ValueError(f"{pretrained}: compile=True supports {COMPILED_MODEL_TYPES}, not {config.model_type!r}: "
                         f"load it with compile=False")
    saved = None  # (recipe, selector) a checkpoint saved by our save_pretrained records, checked before the weights
    if getattr(config, "fitprune_recipe", None) is not None:
        saved = (Recipe.from_dict(config.fitprune_recipe, source=f"{pretrained} config.fitprune_recipe"),
                 selector_from_config(getattr(config, "fitprune_method", None) or "fitprune",
                                      getattr(config, "fitprune_method_options", None)))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).to(device).eval()
    enable_pruning(model)
    if recipe is not None or reduction_ratio is not None or method != "fitprune" or method_options:
        model.set_pruning(recipe, reduction_ratio=reduction_ratio, method=method, **method_options)
    elif saved is not None:  # saved by our save_pretrained: its pruning
        model.set_pruning(saved[0], selector=saved[1])
    if compile:
        enable_fast_path(model)
    return model, load_processor(pretrained, config.model_type)
