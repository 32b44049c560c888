"""`load_pretrained_model`: LLaVA's builder, loading the pruning-aware model with a recipe.

Adapted from llava-torch==1.2.2.post1 llava/model/builder.py (`load_pretrained_model`, LLaVA
branch). Changed: our model class; `recipe=`/`reduction_ratio=`/`method=`; any dtype and device
(LLaVA's forces float16 and CUDA; with its default device_map "auto" the CLIP tower stays float32,
here too); `mm_vision_tower` given relative to the checkpoint resolves against it; a folder whose
name lacks "llava" loads when its config.json's model_type says llava (`llava_kind`). Non-LLaVA
language models and MPT are out of scope and raise.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer

from .modeling import FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM
from .modeling_mistral import FitPruneLlavaMistralConfig, FitPruneLlavaMistralForCausalLM
from .checkpoint import resolve_vision_tower, selector_from_config
from ...core.methods import check_method
from ...core.recipe import Recipe, RecipeError, resolve_recipe


def device_and_dtype(device: str, torch_dtype):
    """The device and torch dtype the builder uses: float16 on CUDA, float32 elsewhere, unless given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available: pass device='cpu'")
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(torch_dtype, str):
        names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
        if torch_dtype not in names:
            raise ValueError(f"torch_dtype {torch_dtype!r} is not one of {sorted(names)}")
        torch_dtype = names[torch_dtype]
    return device, torch_dtype


def llava_kind(model_path: str, model_name: str) -> str:
    """What LLaVA's name rules read (llava/model/builder.py: "llava" in it, "mistral" picks that backbone,
    "mpt" is refused): `model_name` when it says llava, else the checkpoint's config.json `model_type`
    (llava_llama, llava_mistral, llava_fitprune, ...), so a LLaVA folder with any name (`checkpoint/`)
    loads. Raises OSError when `model_path` has no config.json (a missing folder)."""
    if "llava" in model_name.lower():
        return model_name
    from transformers import PretrainedConfig

    model_type = str(PretrainedConfig.get_config_dict(model_path)[0].get("model_type") or "")
    if "llava" not in model_type.lower():
        raise ValueError(f"{model_path} does not look like a LLaVA checkpoint: neither its name {model_name!r} nor "
                         f"its config.json's model_type {model_type!r} says llava; pass a LLaVA checkpoint")
    return model_type


def _classes(model_name: str):
    """LLaVA picks the Mistral backbone by name (llava/model/builder.py); so do we (`llava_kind`)."""
    if "mistral" in model_name.lower():
        return FitPruneLlavaMistralConfig, FitPruneLlavaMistralForCausalLM, True
    return FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM, False


def _load_config(model_path: str, config_class, attn_implementation: Optional[str]) -> FitPruneLlavaConfig:
    base = AutoConfig.from_pretrained(model_path)
    config = config_class(**base.to_dict())
    if attn_implementation is not None:  # from_pretrained ignores the kwarg when a config object is passed
        config._attn_implementation = attn_implementation
    return config


def _check_pruning_arguments(recipe, reduction_ratio, method: Optional[str], method_options, config,
                             keep_saved: bool, source: str) -> None:
    """Everything about the pruning arguments (and a saved model's pruning) checked before a weight is read."""
    if method is not None:
        check_method(method, method_options)
    elif method_options:
        raise ValueError("method_options given without a method: pass method='fastv' (or another) too")
    reference = resolve_recipe(recipe, reduction_ratio, num_layers=config.num_hidden_layers)
    saved = getattr(config, "fitprune_recipe", None)
    if saved is not None:
        saved = resolve_recipe(Recipe.from_dict(saved, source=source), num_layers=config.num_hidden_layers)
        if keep_saved:  # the saved selector must be rebuildable from its options
            selector_from_config(getattr(config, "fitprune_method", "fitprune"),
                                 getattr(config, "fitprune_method_options", None))
    if method == "lvprune" and not (method_options or {}).get("modules"):
        raise ValueError("lvprune needs method_options={'modules': folder of trained LVPruning modules}")
    if method == "lvprune" and reference is not None:
        raise ValueError("LVPruning's schedule is set by its trained modules: drop recipe / reduction_ratio")
    if method == "random" and reference is None and saved is None:
        raise ValueError("random uses FitPrune's schedule: give a recipe or a reduction_ratio")


def load_pretrained_model(
    model_path: str,
    model_base: Optional[str],
    model_name: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map="auto",
    device: str = "cuda",
    use_flash_attn: bool = False,
    *,
    recipe: "Recipe | dict | str | None" = None,
    reduction_ratio: Optional[float] = None,
    method: Optional[str] = None,
    torch_dtype=None,
    attn_implementation: Optional[str] = None,
    method_options: Optional[dict] = None,
    num_text_tokens: int = 65,
    compile: bool = False,
    **kwargs,
):
    """Same arguments and 4-tuple as `llava.model.builder.load_pretrained_model`, plus pruning.

    Returns (tokenizer, model, image_processor, context_len); `model` is a
    `FitPruneLlavaLlamaForCausalLM` using `recipe` (a Recipe, its dict or a JSON path) or the built-in recipe
    for `reduction_ratio`; neither means dense (the stock model's outputs), or, for a checkpoint saved
    by `save_pretrained`, its own pruning (schedule, method and options). `method`: fitprune (default),
    random (FitPrune's schedule, random tokens), fastv / uniform (at equal FLOPs to the recipe for a
    prompt of `num_text_tokens` text tokens, or `method_options` such as {"k": 2, "r": 0.5}),
    lvprune (`method_options={"modules": folder}`); see methods.py. The method, its options and the
    recipe are checked before any weight is read. `compile=True` turns on the fast
    path for this model (fast_path.py: on CUDA a compiled prefill; a static per-layer KV cache and a
    CUDA-graphed decode step; on the CPU the prefill stays eager, see fast_path.PREFILL_AUTO).
    """
    kind = llava_kind(model_path, model_name)
    if "mpt" in kind.lower() or "lora" in model_name.lower():
        raise NotImplementedError("MPT and unmerged LoRA checkpoints are not supported: merge the LoRA first")
    device, torch_dtype = device_and_dtype(device, torch_dtype)
    kwargs = {"device_map": device_map if device.startswith("cuda") else {"": device}, **kwargs}
    if load_8bit:
        kwargs["load_in_8bit"] = True
    elif load_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4")
    else:
        kwargs["torch_dtype"] = torch_dtype
    if use_flash_attn:
        attn_implementation = "flash_attention_2"
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation

    config_class, model_class, fast_tokenizer = _classes(kind)
    config = _load_config(model_path, config_class, attn_implementation)
    keep_saved = recipe is None and reduction_ratio is None and not method_options and method in (None, "fitprune")
    _check_pruning_arguments(recipe, reduction_ratio, method, method_options, config, keep_saved,
                             source=os.path.join(model_path, "config.json"))
    saved = getattr(config, "fitprune_recipe", None)
    if not keep_saved:  # the pruning asked for replaces the checkpoint's (built after loading)
        config.fitprune_recipe = None
    tower_given = resolve_vision_tower(config, model_path)  # relative to model_path, also with a model_base
    if model_base is not None:  # a projector-only checkpoint on top of a base language model
        tokenizer = AutoTokenizer.from_pretrained(model_base, use_fast=fast_tokenizer)
        model = model_class.from_pretrained(model_base, low_cpu_mem_usage=True, config=config, **kwargs)
        projector = torch.load(os.path.join(model_path, "mm_projector.bin"), map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.to(torch_dtype) for k, v in projector.items()}, strict=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=fast_tokenizer)
        model = model_class.from_pretrained(model_path, low_cpu_mem_usage=True, config=config, **kwargs)
    model.vision_tower_given = tower_given

    if getattr(model.config, "mm_use_im_patch_token", True):
        from llava.constants import DEFAULT_IMAGE_PATCH_TOKEN

        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN

        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model(device_map=kwargs["device_map"] if device.startswith("cuda") else None)
    if device_map == "auto":  # as LLaVA: the tower keeps CLIPVisionModel's float32 (it casts images itself)
        vision_tower.to(device=model.device)
    else:  # LLaVA casts it to the language model's dtype only for an explicit device_map
        vision_tower.to(device=model.device, dtype=torch_dtype)
    image_processor = vision_tower.image_processor

    if not keep_saved:  # no recipe / ratio given: the checkpoint's schedule is the reference (lvprune: none)
        reference = recipe if recipe is not None or reduction_ratio is not None or method == "lvprune" else saved
        model.set_pruning(reference, reduction_ratio=reduction_ratio, method=method or "fitprune",
                          method_options=method_options, num_text_tokens=num_text_tokens)
    model.eval()
    if compile:
        from .fast_path import enable_fast_path

        enable_fast_path(model)

    context_len = getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len


__all__ = ["load_pretrained_model", "RecipeError"]
