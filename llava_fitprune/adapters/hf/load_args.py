"""`load_pretrained`'s arguments, checked before any weight is read: each bad one is a ValueError of
one line naming the argument and what it may be (issue #24)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...core.flops import LMShape
from ...core.methods import build_method
from ...core.recipe import Recipe
from ...core.selectors import TokenSelector
from .window import check_window_attention, layer_windows

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
FLASH = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available",
         "flash_attention_4": "is_flash_attn_4_available"}


@dataclass
class Pruning:
    """What `load_pretrained` puts on the model once loaded (checked against the config)."""

    schedule: Optional[Recipe]
    selector: TokenSelector


def check_dtype(dtype):
    """None -> float32; a floating torch dtype or its name; "auto": the checkpoint's dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = dtype[len("torch."):] if dtype.startswith("torch.") else dtype
        if name == "auto":
            return "auto"
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"dtype {dtype!r} is not one of {[*DTYPES, 'auto']} (or a floating torch.dtype)")


def check_device(device) -> torch.device:
    """A device this machine has: cpu, cuda[:i], mps, xpu[:i]."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; use one of {list(DEVICE_TYPES)} "
                         f"(with an index: 'cuda:1')") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r}: type {dev.type!r} is not one of {list(DEVICE_TYPES)}")
    if dev.type != "cpu":
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type)
        count = backend.device_count() if hasattr(backend, "device_count") else int(backend.is_available())
        if not backend.is_available() or count == 0:
            raise ValueError(f"device {device!r}: this machine has no {dev.type} device (torch {torch.__version__}); "
                             f"use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} {dev.type} device(s), indices 0..{count - 1}")
    return dev


def check_attn_implementation(attn_implementation: Optional[str]) -> None:
    """None (transformers' default), eager, sdpa, flex_attention, an installed flash attention, or a
    hub kernel ('org/repo')."""
    if attn_implementation is None:
        return
    from transformers import utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in k)]
    if not isinstance(attn_implementation, str) or (attn_implementation not in known and "/" not in attn_implementation):
        raise ValueError(f"attn_implementation {attn_implementation!r} is not one of {known} (or a hub kernel 'org/repo')")
    if attn_implementation in FLASH and not getattr(utils, FLASH[attn_implementation])():
        raise ValueError(f"attn_implementation {attn_implementation!r}: its package is not installed here; "
                         f"use 'sdpa' or 'eager'")


def check_pruning(config, recipe, reduction_ratio, method: str, method_options: dict,
                  attn_implementation: Optional[str]) -> Optional[Pruning]:
    """The pruning asked for (None: none asked), built against the config's text model."""
    if recipe is None and reduction_ratio is None and method == "fitprune" and not method_options:
        return None
    text_config = config.get_text_config(decoder=True)
    shape = LMShape.from_config(text_config)
    try:
        schedule, selector = build_method(method, recipe=recipe, reduction_ratio=reduction_ratio, shape=shape,
                                          **method_options)
    except TypeError as e:  # unknown option names (core.methods.check_method)
        raise ValueError(f"method options: {e}") from None
    if schedule is not None:
        schedule.check_model(shape.num_layers)
        windows = layer_windows(text_config)
        check_window_attention(windows, attn_implementation or "sdpa")  # None: transformers' default, sdpa
    return Pruning(schedule, selector)
