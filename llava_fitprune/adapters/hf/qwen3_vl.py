"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's layout (image / video placeholders, 3-D
M-RoPE position ids, the same position-id preamble: `QwenTextPruningMixin`) with three differences:

- interleaved M-RoPE: the text model's own rotary embedding lays the t/h/w frequencies out, and the
  pruning loop gathers its (cos, sin) rows with the kept tokens, so kept tokens keep their 3-D positions;
- q/k RMSNorms over head_dim in attention (`layer_step.pruning_layer_forward` applies them);
- DeepStack: after layer l < len(deepstack_visual_embeds), the stock text model adds the vision tower's
  l-th DeepStack features to the hidden states at the visual positions (`_deepstack_process`). Here
  the additions follow the kept rows: each row that is a still-kept visual token gets the feature
  row of its original position, wherever pruning has moved it (`DeepStackAdditions`).

Its processor needs torchvision (the video processor): without it, `QwenImageTextProcessor` (images
and text) stands in, as for Qwen2.5-VL.
"""
from __future__ import annotations

from typing import Optional

import torch

from .qwen2_5_vl import QwenPruningMixin, QwenTextPruningMixin


class Qwen3VLPruningMixin(QwenPruningMixin):
    """image_token_id and video_token_id are the visual tokens, as for Qwen2.5-VL."""

    fitprune_fit_refusal = ("fit cannot calibrate Qwen3-VL yet (its runner, core/fit_runner.py, has neither the "
                            "DeepStack additions nor the q/k norms): use a recipe fitted elsewhere, or fastv / "
                            "uniform / random, which need no fit")


class DeepStackAdditions:
    """Qwen3-VL's DeepStack inputs of one prefill, applied after each of the first layers to the rows
    that are still-kept visual tokens.

    visual_pos_masks: [B, N] bool, the visual positions of the unpruned prefill; deepstack_embeds: per
    layer [V, D], the rows of `visual_pos_masks.nonzero()` in row-major order (the stock layout)."""

    def __init__(self, visual_pos_masks: torch.Tensor, deepstack_embeds: list[torch.Tensor]):
        self.embeds = deepstack_embeds
        mask = visual_pos_masks.bool()
        slot = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)  # [B, N] row in embeds, -1: none
        slot[mask] = torch.arange(int(mask.sum()), device=mask.device)
        self.slot = slot

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor, prune) -> torch.Tensor:
        """hidden_states: [B, N_l, D] after layer `layer_idx`; prune: the PruneState (None: original rows)."""
        if layer_idx >= len(self.embeds):
            return hidden_states
        slot = self.slot.to(hidden_states.device)
        if prune is not None:  # the rows pruning kept: their original positions' slots, real rows only
            slot = torch.where(prune.valid, slot.gather(1, prune.orig_pos), -1)  # [B, N_l]
        rows = slot >= 0  # [B, N_l]
        embeds = self.embeds[layer_idx].to(hidden_states.device, hidden_states.dtype)  # [V, D]
        # as transformers==5.24.0 Qwen3VLTextModel._deepstack_process, at the kept rows
        hidden_states = hidden_states.clone()
        hidden_states[rows, :] = hidden_states[rows, :] + embeds[slot[rows]]
        return hidden_states


class Qwen3VLTextPruningMixin(QwenTextPruningMixin):
    def fitprune_after_layer(self, kwargs: dict) -> Optional[DeepStackAdditions]:
        masks, embeds = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
        if embeds is None or masks is None:
            return None
        return DeepStackAdditions(masks, list(embeds))
