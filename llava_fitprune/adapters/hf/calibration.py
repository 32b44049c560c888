"""Calibration samples for `fit` (core/fit.py) from a transformers VLM of this backend.

For each sample the stock VLM runs up to its text model (vision tower, projector, placeholder merge,
position ids; the text model itself is not run): its layer-0 inputs, the visual mask (the
placeholders), the text after the image, and the rotary (cos, sin) rows of every position, so the
fit runner gives kept tokens their original positions, Qwen2.5-VL's 3-D M-RoPE ones included.
The fit runner's attention is full causal: a model with sliding-window layers is refused.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ...core.calibration import CalibrationError, CalibrationSample
from .window import layer_windows
from ...core.prefill_plan import text_after_last_image


class _Stop(Exception):
    """Raised by the capture hook: the text model's own forward is not needed."""


@torch.no_grad()
def text_model_inputs(model, inputs: dict) -> dict:
    """The keyword arguments the VLM hands its text model for `inputs` (processor outputs)."""
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    hook = model.fitprune_text_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    if not seen:
        raise RuntimeError("the VLM did not call its text model")
    return seen


@torch.no_grad()
def calibration_samples(model, processor, items: Sequence[tuple[Any, str]], question_ids=None) -> list[CalibrationSample]:
    """items: (image, question) pairs, asked with the processor's chat template, one image each."""
    if model.fitprune_fit_refusal:
        raise NotImplementedError(model.fitprune_fit_refusal)
    text_model = model.fitprune_text_model
    if any(w is not None for w in layer_windows(text_model.config)):
        raise CalibrationError("fit computes full causal attention, but this model has sliding-window layers: "
                               "fit a recipe on a model without them, or prune it with an existing recipe")
    samples = []
    for n, (image, question) in enumerate(items):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                  for k, v in dict(processor(images=[image], text=[text], return_tensors="pt")).items()}
        seen = text_model_inputs(model, inputs)
        embeds = seen["inputs_embeds"]  # [1, N, D]
        N = embeds.shape[1]
        visual = model.fitprune_visual_mask(inputs["input_ids"])  # [1, N]
        valid = torch.ones_like(visual)
        position_ids = text_model.fitprune_position_ids(seen.get("position_ids"), 0, 1, N, embeds.device)
        cos, sin = text_model.rotary_emb(embeds, position_ids)  # [1, N, hd]
        qid = question_ids[n] if question_ids is not None else n
        sample = CalibrationSample(qid, embeds, visual, text_after_last_image(visual, valid), rope=(cos, sin))
        if sample.num_visual == 0:
            raise CalibrationError(f"sample {qid!r}: the processor gave no visual tokens")
        samples.append(sample)
    return samples
