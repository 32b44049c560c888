"""`load_pretrained`: a transformers VLM by hub id or local path, with pruning on that instance."""
from __future__ import annotations

from typing import Optional

import torch

from . import internvl, llava_onevision, qwen2_5_vl
from .internvl import InternVLPruningMixin, check_config as check_internvl
from .fast_prefill import COMPILED_MODEL_TYPES, enable_fast_path
from .llava import LlavaPruningMixin
from .llava_onevision import OnevisionPruningMixin
from .load_args import check_attn_implementation, check_device, check_dtype, check_pruning
from .model import attach
from .qwen2_5_vl import QwenPruningMixin, QwenTextPruningMixin
from .qwen3_vl import Qwen3VLPruningMixin, Qwen3VLTextPruningMixin
from ...core.recipe import Recipe
from ...core.saved_method import selector_from_config

# model_type of the config -> (VLM mixin, text-model mixin); the text mixin None: the generic loop
MODEL_TYPES = {
    "llava": (LlavaPruningMixin, None),
    "llava_next": (LlavaPruningMixin, None),
    "llava_onevision": (OnevisionPruningMixin, None),
    "qwen2_vl": (QwenPruningMixin, QwenTextPruningMixin),  # the same text model as Qwen2.5-VL's
    "qwen2_5_vl": (QwenPruningMixin, QwenTextPruningMixin),
    "qwen3_vl": (Qwen3VLPruningMixin, Qwen3VLTextPruningMixin),
    "internvl": (InternVLPruningMixin, None),
}
# model_type -> a check of the config that refuses (one line) what the pruning loop cannot serve
CONFIG_CHECKS = {"internvl": check_internvl}


def check_supported(config, name: str = "this model") -> None:
    """One line (ValueError) when `config` is not a model the pruning loop serves; before any weights."""
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"{name}: model type {config.model_type!r} is not supported by the transformers "
                         f"backend; supported: {sorted(MODEL_TYPES)}")
    if config.model_type in CONFIG_CHECKS:
        CONFIG_CHECKS[config.model_type](config)


# model_type -> its images-and-text processor, for where AutoProcessor cannot build the stock one
# (transformers needs torchvision for these families' video processors):
# (pretrained, config, saved chat template or None) -> processor
PROCESSOR_FALLBACKS = {
    "llava_onevision": llava_onevision.load_image_text_processor,
    "qwen2_vl": qwen2_5_vl.load_image_text_processor,
    "qwen2_5_vl": qwen2_5_vl.load_image_text_processor,
    "qwen3_vl": qwen2_5_vl.load_image_text_processor,  # the same image processor and text interface
    "internvl": internvl.load_image_text_processor,
}


def enable_pruning(model: torch.nn.Module) -> torch.nn.Module:
    """Give a loaded stock model (one of MODEL_TYPES) `set_pruning` and `fitprune_last`; dense until set."""
    from .decoder import PruningTextModelMixin

    check_supported(model.config)
    vlm, text = MODEL_TYPES[model.config.model_type]
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


def load_processor(pretrained: str, config):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(pretrained)
    except (AttributeError, ImportError, ValueError, OSError):
        if config.model_type not in PROCESSOR_FALLBACKS:
            raise
    else:
        if config.model_type in ("llava", "llava_next"):
            processor = fill_legacy_llava_processor(processor, config, pretrained)
        return processor
    # these families' processors need torchvision (their video processors): images and text without it
    return PROCESSOR_FALLBACKS[config.model_type](pretrained, config, saved_chat_template(pretrained))


def saved_chat_template(pretrained: str):
    """The chat template a processor saved beside the weights (chat_template.jinja, or chat_template.json's
    "chat_template"), or None."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(pretrained, name, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            with open(path) as f:
                return f.read() if name.endswith(".jinja") else json.load(f).get("chat_template")
    return None


def load_pretrained(pretrained: str, *, recipe=None, reduction_ratio: Optional[float] = None,
                    method: str = "fitprune", device: str = "cpu", dtype=None,
                    attn_implementation: Optional[str] = None, compile: bool = False, **method_options):
    """(model, processor). See the package docstring (`llava_fitprune.adapters.hf`). Every argument is
    checked (load_args.py) before the weights load."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r}: give True or False")
    dtype, device = check_dtype(dtype), check_device(device)
    check_attn_implementation(attn_implementation)
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as e:
        raise ValueError(f"pretrained {pretrained!r}: cannot read its config (give a local checkpoint folder or a hub id): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_supported(config, pretrained)
    pruning = check_pruning(config, recipe, reduction_ratio, method, method_options, attn_implementation)
    if compile and config.model_type not in COMPILED_MODEL_TYPES:
        raise ValueError(f"{pretrained}: compile=True supports {COMPILED_MODEL_TYPES}, not {config.model_type!r}: "
                         f"load it with compile=False")
    saved = None  # (recipe, selector) a checkpoint saved by our save_pretrained records, checked before the weights
    if pruning is None and getattr(config, "fitprune_recipe", None) is not None:
        saved = (Recipe.from_dict(config.fitprune_recipe, source=f"{pretrained} config.fitprune_recipe"),
                 selector_from_config(getattr(config, "fitprune_method", None) or "fitprune",
                                      getattr(config, "fitprune_method_options", None)))
    processor = load_processor(pretrained, config)  # before the weights: its errors too
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).to(device).eval()
    enable_pruning(model)
    if pruning is not None:  # as built above: the schedule with the method's selector
        model.set_pruning(pruning.schedule, selector=pruning.selector)
    elif saved is not None:  # saved by our save_pretrained: its pruning
        model.set_pruning(saved[0], selector=saved[1])
    if compile:
        enable_fast_path(model)
    return model, processor
