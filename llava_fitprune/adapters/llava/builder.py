"""`load_pretrained_model`: LLaVA's builder, loading the pruning-aware model with a recipe.

Adapted from llava-torch==1.2.2.post1 llava/model/builder.py (`load_pretrained_model`, LLaVA
branch). Changed: our model class; `recipe=`/`reduction_ratio=`/`method=`; any dtype and device
(LLaVA's forces float16 and CUDA); `mm_vision_tower` given relative to the checkpoint resolves
against it. Non-LLaVA language models and MPT are out of scope and raise.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer

from .modeling import FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM
from .modeling_mistral import FitPruneLlavaMistralConfig, FitPruneLlavaMistralForCausalLM
from ...core.recipe import Recipe, RecipeError, resolve_recipe
from ...core.selectors import make_selector


def _device_and_dtype(device: str, torch_dtype):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available: pass device='cpu'")
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                       "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[torch_dtype]
    return device, torch_dtype


def _classes(model_name: str):
    """LLaVA picks the Mistral backbone by name (llava/model/builder.py); so do we."""
    if "mistral" in model_name.lower():
        return FitPruneLlavaMistralConfig, FitPruneLlavaMistralForCausalLM, True
    return FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM, False


def _load_config(model_path: str, config_class, attn_implementation: Optional[str]) -> FitPruneLlavaConfig:
    base = AutoConfig.from_pretrained(model_path)
    config = config_class(**base.to_dict())
    if attn_implementation is not None:  # from_pretrained ignores the kwarg when a config object is passed
        config._attn_implementation = attn_implementation
    tower = getattr(config, "mm_vision_tower", None)
    if tower and not os.path.isabs(tower) and os.path.exists(os.path.join(model_path, tower)):
        config.mm_vision_tower = os.path.abspath(os.path.join(model_path, tower))
    return config


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
    recipe: "Recipe | str | None" = None,
    reduction_ratio: Optional[float] = None,
    method: str = "fitprune",
    torch_dtype=None,
    attn_implementation: Optional[str] = None,
    method_options: Optional[dict] = None,
    num_text_tokens: int = 65,
    compile: bool = False,
    **kwargs,
):
    """Same arguments and 4-tuple as `llava.model.builder.load_pretrained_model`, plus pruning.

    Returns (tokenizer, model, image_processor, context_len); `model` is a
    `FitPruneLlavaLlamaForCausalLM` using `recipe` (a Recipe or JSON path) or the built-in recipe
    for `reduction_ratio`; neither means dense (the stock model's outputs). `method`: fitprune,
    random (FitPrune's schedule, random tokens), fastv / uniform (at equal FLOPs to the recipe for a
    prompt of `num_text_tokens` text tokens, or `method_options` such as {"k": 2, "r": 0.5}),
    lvprune (`method_options={"modules": folder}`); see methods.py. `compile=True` turns on the fast
    path for this model (fast_path.py: static KV cache, compiled / CUDA-graphed decode).
    """
    if "llava" not in model_name.lower():
        raise ValueError(f"model name {model_name!r} does not look like a LLaVA checkpoint (no 'llava' in it)")
    if "mpt" in model_name.lower() or "lora" in model_name.lower():
        raise NotImplementedError("MPT and unmerged LoRA checkpoints are not supported: merge the LoRA first")
    device, torch_dtype = _device_and_dtype(device, torch_dtype)
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

    config_class, model_class, fast_tokenizer = _classes(model_name)
    if model_base is not None:  # a projector-only checkpoint on top of a base language model
        tokenizer = AutoTokenizer.from_pretrained(model_base, use_fast=fast_tokenizer)
        config = _load_config(model_path, config_class, attn_implementation)
        model = model_class.from_pretrained(model_base, low_cpu_mem_usage=True, config=config, **kwargs)
        projector = torch.load(os.path.join(model_path, "mm_projector.bin"), map_location="cpu")
        model.load_state_dict({k: v.to(torch_dtype) for k, v in projector.items()}, strict=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=fast_tokenizer)
        config = _load_config(model_path, config_class, attn_implementation)
        model = model_class.from_pretrained(model_path, low_cpu_mem_usage=True, config=config, **kwargs)

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
    vision_tower.to(device=model.device, dtype=torch_dtype)
    image_processor = vision_tower.image_processor

    saved = getattr(model.config, "fitprune_recipe", None)
    chosen = resolve_recipe(recipe, reduction_ratio, num_layers=len(model.get_model().layers))
    if chosen is None and saved is not None and recipe is None and reduction_ratio is None:
        chosen = Recipe.from_dict(saved, source=f"{model_path}/config.json")
    if method in ("fitprune", "random") and not method_options:
        model.set_pruning(chosen, make_selector(method))
    else:  # baselines at equal FLOPs to the chosen recipe, LVPruning with its modules (methods.py)
        from ...core.methods import build_method

        n_visual = getattr(vision_tower, "num_patches", None)
        schedule, selector = build_method(method, recipe=chosen, model=model, num_text_tokens=num_text_tokens,
                                          num_visual_tokens=n_visual, **(method_options or {}))
        model.set_pruning(schedule, selector)
    model.eval()
    if compile:
        from .fast_path import enable_fast_path

        enable_fast_path(model)

    context_len = getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len


__all__ = ["load_pretrained_model", "RecipeError"]
