"""The plugin's two contacts with the transformers-native backend (llava_fitprune.adapters.hf): loading a
checkpoint with pruning, and reading what the prefill that just ran did to each sample."""
from __future__ import annotations

from typing import Any

import torch

from ..core.flops import dense_prefill_flops


def load(pretrained: str, **kwargs) -> tuple[Any, Any]:
    """`(model, processor)`: a transformers model with per-instance pruning and its processor.
    kwargs: recipe, reduction_ratio, method, device, dtype, attn_implementation and method options."""
    from ..adapters.hf import load_pretrained

    return load_pretrained(pretrained, **kwargs)


def prefill_records(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[dict[str, Any]]:
    """One JSON-ready record per sample of the prefill that just ran on `input_ids` ([B, N], left-padded;
    `attention_mask` [B, N]): method, recipe fingerprint (None: dense), visual tokens entering the language
    model and kept after its last layer, real tokens entering each layer, prefill TFLOPs pruned and dense.

    The backend keeps `model.fitprune_last` (a PrefillRecord) for the last prefill that pruned; a dense
    model, or a batch without visual tokens, leaves none (or an older one): those prefills are dense."""
    visual = model.fitprune_visual_mask(input_ids).sum(1).tolist()  # [B]
    last = model.fitprune_last
    if last is not None and list(last.visual_tokens) == visual:
        return [{"method": last.method, "recipe": last.recipe_fingerprint, "visual_tokens": int(last.visual_tokens[b]),
                 "visual_tokens_kept": int(last.visual_tokens_kept[b]), "tokens_entering": list(last.tokens_entering[b]),
                 "prefill_tflops": float(last.prefill_tflops[b]), "dense_prefill_tflops": float(last.dense_prefill_tflops[b])}
                for b in range(len(visual))]
    if model.fitprune_recipe is not None and any(visual):
        raise RuntimeError(f"the model prunes, but its record of the last prefill ({last}) is not of this batch "
                           f"(visual tokens {visual})")
    shape = model.fitprune_shape
    records = []
    for n_visual, n_real in zip(visual, attention_mask.sum(1).tolist()):
        tflops = dense_prefill_flops(shape, int(n_real)) / 1e12
        records.append({"method": "dense", "recipe": None, "visual_tokens": int(n_visual),
                        "visual_tokens_kept": int(n_visual), "tokens_entering": [int(n_real)] * (shape.num_layers + 1),
                        "prefill_tflops": tflops, "dense_prefill_tflops": tflops})
    return records
