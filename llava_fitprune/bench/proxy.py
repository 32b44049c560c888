"""The host-bound CPU proxy of a batch-1 prefill, and a counter of the aten ops it dispatches.

The proxy is a named shape's depth (llava-v1.5-7b: 32 layers) at a small width with random weights, fed
one prompt of a given layout (text before the image, visual tokens, text after). At batch 1 on a GPU a
prefill is bound by the host's launches, one per dispatched op; this proxy shows the same op sequence on a
CPU. Used by `scripts/prefill_proxy.py` (timings) and `tests/test_prefill_ops.py` (op counts).
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .models import PromptLayout, build_lm, load_lm_config, make_inputs


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the `with` block, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def build_proxy(model: str = "llava-v1.5-7b", width: int = 128, layout: PromptLayout = PromptLayout(35, 576, 30)):
    """(language model, inputs_embeds [1, N, D], visual_mask [1, N]) of the proxy: fp32, sdpa, CPU."""
    cfg, _ = load_lm_config(model, width=width)
    lm = build_lm(model, cfg, False, "sdpa", torch.float32, "cpu")
    embeds, visual = make_inputs(lm, layout, 1)
    return lm, embeds, visual
