"""Model loading for the eval modules: one function, so the loader can be swapped in one place."""
from __future__ import annotations

import os
import time

import torch

from ..core.recipe import Recipe, resolve_recipe


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available: use --device cpu")
    return device


def load_model(args, model_name: str):
    """(tokenizer, model, image_processor, context_len) with the pruning flags applied."""
    from ..adapters.llava.builder import load_pretrained_model

    return load_pretrained_model(
        os.path.expanduser(args.model_path), args.model_base, model_name, device=resolve_device(args.device),
        recipe=args.recipe, reduction_ratio=args.reduction_ratio, method=args.method, torch_dtype=args.dtype,
        attn_implementation=args.attn_implementation, compile=getattr(args, "compile", False))


def timed_load(args, model_name: str):
    t0 = time.time()
    out = load_model(args, model_name)
    return out, time.time() - t0


def used_recipe(model, args) -> Recipe | None:
    """The recipe the model runs: its own when it is the pruning model, else what the flags name."""
    if hasattr(model, "set_pruning"):
        return model.recipe
    return resolve_recipe(args.recipe, args.reduction_ratio, num_layers=model.config.num_hidden_layers)
