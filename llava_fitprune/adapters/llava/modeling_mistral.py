"""The pruning-aware model for LLaVA-NeXT's Mistral backbone (`LlavaMistralForCausalLM`).

The decoder loop and the causal-LM plumbing are the Llama ones (modeling.py mixins): Mistral's
decoder layer has the same structure. Mistral's sliding window is not applied by our masks, so a
sequence longer than the window is refused rather than computed differently from stock.
"""
from __future__ import annotations

import torch.nn as nn
from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM, LlavaMistralModel
from transformers import AutoConfig, AutoModelForCausalLM, MistralForCausalLM

from .modeling import PruningCausalLMMixin, PruningDecoderMixin


class FitPruneLlavaMistralConfig(LlavaMistralConfig):
    model_type = "llava_mistral_fitprune"


class FitPruneLlavaMistralModel(PruningDecoderMixin, LlavaMistralModel):
    config_class = FitPruneLlavaMistralConfig

    def forward(self, *args, **kwargs):
        window = getattr(self.config, "sliding_window", None)
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids") if embeds is None else embeds
        past = kwargs.get("past_key_values")
        length = (0 if past is None else past.seen_tokens if hasattr(past, "seen_tokens") else past[0][0].shape[-2])
        if window is not None and ids is not None and length + ids.shape[1] > window:
            raise NotImplementedError(
                f"sequence of {length + ids.shape[1]} tokens exceeds Mistral's sliding window {window}, "
                f"which the pruning model does not apply: shorten the prompt")
        return super().forward(*args, **kwargs)


class FitPruneLlavaMistralForCausalLM(PruningCausalLMMixin, LlavaMistralForCausalLM):
    config_class = FitPruneLlavaMistralConfig

    # Adapted from llava-torch==1.2.2.post1 llava/model/language_model/llava_mistral.py
    # LlavaMistralForCausalLM.__init__; changed: the language model class.
    def __init__(self, config):
        super(MistralForCausalLM, self).__init__(config)
        self.model = FitPruneLlavaMistralModel(config)  # ours
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._init_pruning(config)  # ours


AutoConfig.register("llava_mistral_fitprune", FitPruneLlavaMistralConfig)
AutoModelForCausalLM.register(FitPruneLlavaMistralConfig, FitPruneLlavaMistralForCausalLM)
