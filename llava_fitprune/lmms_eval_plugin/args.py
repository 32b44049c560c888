"""The plugin's `--model_args`, checked before any weights load: `check_model_args(...)` returns the settings
(a `ModelArgs`) and the checkpoint's config, or raises `ModelArgsError` with one line naming the argument
and the fix. lmms-eval's command line turns that into one line on stderr and exit status 2
(`FitPruneHF.create_from_arg_string`).

What is checked without the weights: the keys (the plugin's own and the chosen method's options), the
method, recipe vs reduction_ratio, the recipe file, the ratio (a built-in recipe exists for it), the
schedule against the checkpoint's depth (the same `build_method` call `set_pruning` makes, on the
config's shape), batch_size, dtype, device, attn_implementation, chat_template, and that `pretrained`
holds a config of this lmms-eval model's family.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core.flops import LMShape
from ..core.methods import METHOD_OPTIONS, METHODS, build_method
from ..core.recipe import check_reduction_ratio

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# build_method's own keys (a schedule's size where no recipe gives it: e.g. fastv's budget needs both)
SCHEDULE_KEYS = ("num_visual_tokens", "num_text_tokens")
# lmms-eval passes max_batch_size with --batch_size auto (refused below); it is accepted and unused.
IGNORED_KEYS = ("max_batch_size",)


class ModelArgsError(ValueError):
    """A bad `--model_args` value: one line, naming the argument and the fix."""


@dataclass(frozen=True)
class ModelArgs:
    """The plugin's settings, checked. `method_options` go to the pruning method (core.methods)."""

    pretrained: str
    recipe: Optional[str] = None
    reduction_ratio: Optional[float] = None
    method: str = "fitprune"
    device: Optional[str] = None  # None: cuda when available, else cpu
    dtype: Any = "auto"  # "auto" (the checkpoint's own, as lmms-eval's llava_hf) or a torch.dtype
    batch_size: int = 1
    attn_implementation: Optional[str] = None
    chat_template: Optional[str] = None
    compile: bool = False  # the compiled prefill (adapters/hf/fast_prefill.py)
    method_options: dict = field(default_factory=dict)  # the method's options, num_visual_tokens, num_text_tokens

    @property
    def prunes(self) -> bool:
        return (self.recipe is not None or self.reduction_ratio is not None or self.method != "fitprune"
                or bool(self.method_options))


PLUGIN_KEYS = tuple(f.name for f in dataclasses.fields(ModelArgs) if f.name != "method_options")


def _dtype(value: Any) -> Any:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if value == "auto" or value is None:
        return "auto"
    name = str(value).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise ModelArgsError(f"dtype={value!r} is not a floating torch dtype: use auto (the checkpoint's), "
                             f"{', '.join(FLOAT_DTYPES)}")
    return getattr(torch, name)


def _batch_size(value: Any) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ModelArgsError(f"batch_size={value!r}: give a positive integer ('auto' is not supported)")
    return int(value)


def _device(value: Any) -> Optional[str]:
    if value is None:
        return None
    try:
        device = torch.device(str(value))
    except (RuntimeError, ValueError):
        raise ModelArgsError(f"device={value!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ModelArgsError(f"device={value!r}: this machine has {count} CUDA device(s); use cpu"
                                 + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    return str(value)


def _attn_implementation(value: Any) -> Optional[str]:
    if value is None:
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if not isinstance(value, str) or (value not in known and "/" not in value):  # "/": a hub kernel repo
        raise ModelArgsError(f"attn_implementation={value!r} is not one of {known} (or a hub kernel repo)")
    return value


def _reduction_ratio(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, str):  # lmms-eval passes numbers parsed; a Python caller may pass "0.6"
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (str, bool)) or not isinstance(value, numbers.Real):
        raise ModelArgsError(f"reduction_ratio={value!r} is not a number: give the fraction of prefill FLOPs "
                             f"removed, e.g. reduction_ratio=0.6")
    try:
        return check_reduction_ratio(value)
    except ValueError as e:
        raise ModelArgsError(str(e)) from None


def _load_config(pretrained: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelArgsError(f"pretrained={pretrained}: no checkpoint config there ({first}); give a local "
                             f"checkpoint folder or a hub id") from None


def check_model_args(model_types: tuple[str, ...], default_pretrained: str, pretrained: Optional[str] = None,
                     **kwargs) -> tuple[ModelArgs, Any]:
    """(ModelArgs, the checkpoint's transformers config) from lmms-eval's keyword arguments, or
    ModelArgsError. Nothing here reads the weights."""
    method = kwargs.get("method", "fitprune")
    if method not in METHOD_OPTIONS:
        raise ModelArgsError(f"method={method!r} is not a pruning method: use one of {list(METHODS)}")
    options = {k: v for k, v in kwargs.items() if k not in PLUGIN_KEYS and k not in IGNORED_KEYS}
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]) - set(SCHEDULE_KEYS))
    if unknown:
        raise ModelArgsError(f"unknown --model_args key(s) {unknown}: the plugin takes {list(PLUGIN_KEYS)}, "
                             f"{list(SCHEDULE_KEYS)}, and method {method} the options "
                             f"{list(METHOD_OPTIONS[method]) or 'none'}")
    if kwargs.get("recipe") is not None and kwargs.get("reduction_ratio") is not None:
        raise ModelArgsError("give recipe= or reduction_ratio=, not both")
    chat_template = kwargs.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ModelArgsError(f"chat_template={chat_template!r}: give the Jinja template text")
    compile = kwargs.get("compile", False)
    if not isinstance(compile, bool):  # lmms-eval turns True / False (any case) into a bool
        raise ModelArgsError(f"compile={compile!r}: give compile=True or compile=False")
    recipe = kwargs.get("recipe")
    args = ModelArgs(
        pretrained=str(pretrained or default_pretrained), recipe=None if recipe is None else str(recipe),
        reduction_ratio=_reduction_ratio(kwargs.get("reduction_ratio")), method=method,
        device=_device(kwargs.get("device")), dtype=_dtype(kwargs.get("dtype", "auto")),
        batch_size=_batch_size(kwargs.get("batch_size", 1)),
        attn_implementation=_attn_implementation(kwargs.get("attn_implementation")),
        chat_template=chat_template, compile=compile, method_options=options)
    config = _load_config(args.pretrained)
    if config.model_type not in model_types:
        raise ModelArgsError(f"{args.pretrained} is a {config.model_type!r} checkpoint, this lmms-eval model runs "
                             f"{model_types}: choose --model by the checkpoint's family")
    if args.prunes:  # what set_pruning will build, on the config's shape: recipe file, ratio, depth, options
        try:
            shape = LMShape.from_config(config.get_text_config(decoder=True))
            schedule, _ = build_method(method, recipe=args.recipe, reduction_ratio=args.reduction_ratio,
                                       shape=shape, **options)
            if schedule is not None:
                schedule.check_model(shape.num_layers)
        except (ValueError, TypeError) as e:
            raise ModelArgsError(str(e).splitlines()[0]) from None
    return args, config
