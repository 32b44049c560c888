"""`load_pretrained`'s bad arguments (issue #24): each is one line (a ValueError naming the argument
and what it may be), raised before any weight is read."""
from __future__ import annotations

import pytest
import torch

from llava_fitprune.adapters.hf import load_pretrained


def _no_cuda_device() -> str:
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


BAD = [  # (kwargs, what the one line must say)
    (dict(dtype="float64x"), r"dtype 'float64x' is not one of \['float32', 'float16', 'bfloat16', 'float64', 'auto'\]"),
    (dict(dtype=torch.int8), r"dtype torch.int8 is not one of"),
    (dict(device=_no_cuda_device()), r"device 'cuda(:\d+)?': this machine has (no cuda device|\d+ cuda device)"),
    (dict(device="gpu"), r"device 'gpu' is not a device name; use one of \['cpu', 'cuda', 'mps', 'xpu'\]"),
    (dict(device="meta"), r"device 'meta': type 'meta' is not one of"),
    (dict(attn_implementation="sdpa2"), r"attn_implementation 'sdpa2' is not one of \['eager', .*'sdpa'"),
    (dict(method="fastvv"), r"unknown pruning method 'fastvv'; available: \['fitprune', 'fastv'"),
    (dict(method="random", reduction_ratio=0.6, sed=3), r"method options: method 'random' takes options \['seed'\]"),
    (dict(reduction_ratio=60), r"reduction_ratio 60 is outside \[0, 1\)"),
    (dict(recipe="/nonexistent/recipe.json"), r"/nonexistent/recipe.json"),
    (dict(recipe="/nonexistent/recipe.json", reduction_ratio=0.6), r"either a recipe or a reduction_ratio"),
    (dict(reduction_ratio=0.6), r"32 layers but the model has 4"),
    (dict(method="fastv", k=99, num_visual_tokens=64), r"FastV layer K=99 must lie in \[1, 4\]"),
]


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test."""
    from transformers import AutoModelForImageTextToText

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)


@pytest.mark.parametrize("kwargs,message", BAD, ids=[",".join(k) for k, _ in BAD])
def test_bad_argument_is_one_line_before_weights(tiny_paths, no_weights, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        load_pretrained(tiny_paths["llava"], **kwargs)
    assert "\n" not in str(err.value)


def test_bad_paths_and_attention_before_weights(tiny_paths, window_paths, no_weights, tmp_path):
    with pytest.raises(ValueError, match=r"pretrained '.*missing': cannot read its config") as err:
        load_pretrained(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="pruning a sliding-window model needs attn_implementation 'sdpa' or 'eager'"):
        load_pretrained(window_paths["next_mistral"], reduction_ratio=None, recipe=_four_layer_recipe(),
                        attn_implementation="flex_attention")
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(ValueError, match="attn_implementation 'flash_attention_2': its package is not installed"):
            load_pretrained(tiny_paths["llava"], attn_implementation="flash_attention_2")


def _four_layer_recipe():
    from llava_fitprune.core.recipe import Recipe

    return Recipe([10, 20, 5, 0], num_visual_tokens=64)


@torch.no_grad()
def test_good_arguments_still_load(tiny_paths):
    """The checked forms load: a dtype name (and 'torch.' prefix, 'auto'), a torch.device, a method with options."""
    model, _ = load_pretrained(tiny_paths["qwen"], dtype="torch.float32", device=torch.device("cpu"),
                               method="random", recipe=_four_layer_recipe(), seed=5)
    assert model.dtype == torch.float32 and model.fitprune_text_model.fitprune.selector.seed == 5
    assert model.fitprune_recipe.method == "random"
    model, _ = load_pretrained(tiny_paths["llava"], dtype="auto")
    assert model.dtype == torch.float32  # the tiny checkpoint's own
