"""Pruning-aware LLaVA: subclasses of LLaVA's classes that override the decoder loop only.

Layers that drop nothing run the stock `LlamaDecoderLayer` (eager, sdpa or flash_attention_2 as
configured). A layer that drops tokens runs `pruning_layer_forward` (layer_step.py): attention
once, the scores read from the rows that need them, rows gathered by index before `o_proj`/MLP.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from llava.constants import IGNORE_INDEX
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from torch.nn import CrossEntropyLoss
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaForCausalLM, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import PrunedCache, check_attention_mask, continuation_mask
from .checkpoint import (refuse_unrestorable, resolve_vision_tower, selector_from_config, selector_options,
                         tower_path_for_save)
from .layer_step import RopeSpan, RopeTable, attention_mask_4d, pruning_layer_forward
from ...core.prefill_plan import make_plan, text_after_last_image  # noqa: F401 (text_after_last_image: calibration)
from ...core.recipe import Recipe, resolve_recipe
from ...core.selectors import DropRecord, FitPruneSelector, OracleSelector, TokenSelector

_HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_TEXT_LABEL = -1  # marks text labels while LLaVA expands images (its image positions get IGNORE_INDEX)


class FitPruneLlavaConfig(LlavaConfig):
    model_type = "llava_fitprune"


@dataclass
class PruneTrace:
    """What the last prefill did: lengths per layer and, per pruning layer, the dropped positions."""

    tokens_entering: list[int]  # sequence length entering each layer, plus the final
    visual_entering: list[list[int]]  # [L + 1][B] visual tokens alive entering each layer
    records: list[Optional[DropRecord]] = field(default_factory=list)  # per layer (None: no drop)
    final_positions: Optional[torch.Tensor] = None  # [B, N_L] original index of each output row
    final_valid: Optional[torch.Tensor] = None  # [B, N_L] bool

    @cached_property
    def dropped_positions(self) -> list[Optional[torch.Tensor]]:
        """Per layer: [B, N_l] original positions dropped there, -1 where kept (None: no drop).
        Made on first read, after the prefill: the layer loop only keeps what it had."""
        return [None if r is None else r.positions() for r in self.records]


class PruningDecoderMixin:
    """The decoder-loop override, shared by the Llama and Mistral language models of LLaVA."""

    def __init__(self, config):
        super().__init__(config)
        self.rope_span = RopeSpan()
        for layer in self.layers:  # per-instance: the table must reach original positions after pruning
            layer.self_attn.rotary_emb = RopeTable(layer.self_attn.rotary_emb, self.rope_span)
        self.recipe: Optional[Recipe] = None
        self.selector: TokenSelector = FitPruneSelector()
        self.last_trace: Optional[PruneTrace] = None

    # Adapted from transformers==4.37.2 models/llama/modeling_llama.py LlamaModel.forward.
    # Changed: per-layer key masks and KV lengths (PrunedCache), layers with drops run
    # pruning_layer_forward, `visual_mask` / `selector` arguments, PruneTrace. Marked "# ours".
    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        visual_mask: Optional[torch.Tensor] = None,  # ours: [B, N] bool, True at visual tokens
        selector: Optional[TokenSelector] = None,  # ours: overrides self.selector for this call
        key_bias_hook: Optional[Callable] = None,  # ours: (layer_idx, hidden [B, N, D]) -> [B, K] additive key bias or None
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You have to specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        batch_size, seq_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        cache = PrunedCache.from_any(past_key_values) if use_cache else None  # ours
        past_seen = cache.seen_tokens if cache is not None else 0
        check_attention_mask(attention_mask, past_seen, seq_length)  # ours
        attention_mask_given = attention_mask is not None  # ours
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_seen + seq_length, dtype=torch.bool, device=device)
        valid = attention_mask[:, -seq_length:].bool()  # ours: [B, N] real tokens of this step
        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + seq_length, device=device).unsqueeze(0)
        position_ids = position_ids.expand(batch_size, -1)
        # ours: the rotary table covers every original position: at least the length the stock table
        # already holds (a constant across prompts, so a compiled loop does not depend on it)
        self.rope_span.length = max(past_seen + seq_length, self.rope_span.cached_length(self.layers))

        # ours: prune in a prefill of samples with visual tokens, when the recipe drops anything
        selector = selector or self.selector
        prefill = cache is None or cache.get_seq_length(0) == 0
        if key_bias_hook is not None and self.config._attn_implementation == "flash_attention_2":  # ours
            raise ValueError("key_bias_hook needs an additive attention mask: use attn_implementation 'eager' or 'sdpa'")
        # ours: the plan (one host read) before the first layer; the mask-based path (key_bias_hook,
        # LVPruning training) replaces index pruning for the call
        plan, state = None, None
        if prefill and visual_mask is not None and key_bias_hook is None and (
                self.recipe is not None or isinstance(selector, OracleSelector)):
            visual = visual_mask.bool() & valid
            plan = make_plan(len(self.layers), self.recipe, selector, visual, valid, position_ids)
            if plan is not None:
                state = plan.initial_state(visual, valid, position_ids)
                selector.prepare(state, plan)
        if plan is not None:
            trace = PruneTrace(tokens_entering=plan.lens, visual_entering=plan.visual_entering)
            padded = plan.padded
        else:
            trace = PruneTrace([seq_length] * (len(self.layers) + 1), [])
            # ours: masks are needed when the batch is padded (no mask given: it is not)
            padded = attention_mask_given and not bool(valid.all())
        if cache is not None:
            padded = padded or cache.padded
            cache.padded = padded
            if prefill:  # ours: the tokens each layer caches are known now (a static cache allocates)
                attn = self.layers[0].self_attn
                cache.prepare_prefill(trace.tokens_entering[:-1], inputs_embeds, attn.num_key_value_heads,
                                      attn.head_dim)

        hidden_states, all_hidden_states, all_self_attns = self.decoder_layers(
            inputs_embeds, valid, position_ids, cache, padded, plan, state, selector, trace,
            output_attentions, output_hidden_states, use_cache, key_bias_hook)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if state is not None:
            trace.final_positions, trace.final_valid = state.orig_pos, state.valid
        if prefill:
            self.last_trace = trace  # ours: decode steps keep the prefill's trace

        if not return_dict:
            return tuple(v for v in [hidden_states, cache, all_hidden_states, all_self_attns] if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=cache,
            hidden_states=all_hidden_states, attentions=all_self_attns,
        )

    # The layer loop of transformers==4.37.2 LlamaModel.forward, as a method of its own (ours): a
    # compiled prefill (fast_prefill.py) replaces it per instance. Changed: per-layer key masks,
    # layers with drops run pruning_layer_forward, the key-bias hook, the trace.
    def decoder_layers(self, hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                       output_attentions=False, output_hidden_states=False, use_cache=True, key_bias_hook=None):
        """hidden_states: [B, N, D] -> ([B, N_L, D], hidden states per layer or None, attentions or None)."""
        impl = self.config._attn_implementation
        all_hidden_states = () if output_hidden_states else None
        all_self_attns = () if output_attentions else None
        mask_key, mask = None, None
        # compiled (fast_prefill.py): stock SDPA layers get an explicit mask, since their
        # `is_causal=... and q_len > 1` is a symbol once the length is dynamic
        explicit = padded or torch.compiler.is_compiling()

        for layer_idx, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            q_len = hidden_states.shape[1]
            key_mask = cache.extend_key_mask(layer_idx, valid) if cache is not None else valid  # [B, K_l]
            past_len = key_mask.shape[1] - q_len
            if mask_key is None or mask_key[0] is not key_mask:  # rebuild only when the keys change
                mask_key = (key_mask,)
                # output_attentions makes stock SDPA layers fall back to eager, which needs the explicit mask
                mask = attention_mask_4d(key_mask, q_len, past_len, hidden_states.dtype,
                                         "eager" if output_attentions else impl, explicit)
            bias = key_bias_hook(layer_idx, hidden_states) if key_bias_hook is not None else None  # ours: [B, K_l]
            if bias is not None:  # an explicit additive mask for this layer, the stock layer runs it
                mask_key = None
                mask = attention_mask_4d(key_mask, q_len, past_len, hidden_states.dtype, "eager", True)
                mask = mask + bias[:, None, None, :].to(mask.dtype)

            step = plan.steps.get(layer_idx) if plan is not None else None
            if step is not None:  # ours
                additive = mask if impl != "flash_attention_2" or not padded else \
                    attention_mask_4d(key_mask, q_len, 0, hidden_states.dtype, "eager", True)
                hidden_states, record = pruning_layer_forward(
                    decoder_layer, layer_idx, hidden_states, additive if padded else None, cache, state, selector, step)
                valid, position_ids = state.valid, state.positions
                trace.records.append(record)
                if output_attentions:
                    all_self_attns += (None,)
                continue
            if plan is not None:
                trace.records.append(None)

            if self.gradient_checkpointing and self.training:
                layer_outputs = self._gradient_checkpointing_func(
                    decoder_layer.__call__, hidden_states, mask, position_ids, cache, output_attentions, use_cache,
                )
            else:
                layer_outputs = decoder_layer(
                    hidden_states, attention_mask=mask, position_ids=position_ids, past_key_value=cache,
                    output_attentions=output_attentions, use_cache=use_cache,
                )
            hidden_states = layer_outputs[0]
            if output_attentions:
                all_self_attns += (layer_outputs[1],)
        return hidden_states, all_hidden_states, all_self_attns


class FitPruneLlavaLlamaModel(PruningDecoderMixin, LlavaLlamaModel):
    config_class = FitPruneLlavaConfig


class PruningCausalLMMixin:
    """Pruning control, the visual mask and LLaVA's forward/generate, shared by Llama and Mistral."""

    def _init_pruning(self, config) -> None:
        recipe = getattr(config, "fitprune_recipe", None)
        if recipe is not None:  # a saved pruning model: its schedule and its selector with its options
            selector = selector_from_config(getattr(config, "fitprune_method", "fitprune"),
                                            getattr(config, "fitprune_method_options", None))
            self.set_pruning(Recipe.from_dict(recipe, source="config.fitprune_recipe"), selector)

    # -- pruning control --------------------------------------------------------------------------
    def set_pruning(self, recipe: "Recipe | dict | str | os.PathLike | None" = None,
                    selector: Optional[TokenSelector] = None, *, reduction_ratio: Optional[float] = None,
                    method: Optional[str] = None, method_options: Optional[dict] = None,
                    num_text_tokens: int = 65) -> None:
        """Prune from now on as `load_pretrained_model` would; recorded in the config, so saved with it.

        recipe: a Recipe, its dict or a JSON path; or `reduction_ratio` for the built-in recipe; neither
        is dense. Then either `selector` (a TokenSelector object) or `method` + `method_options`
        (methods.build_method: fitprune, random, fastv, uniform, lvprune; default fitprune).
        """
        if selector is not None and (method is not None or method_options):
            raise ValueError("give either a selector or a method (with method_options), not both")
        if selector is not None or (method in (None, "fitprune") and not method_options):
            schedule = resolve_recipe(recipe, reduction_ratio, num_layers=len(self.model.layers))
            selector = selector or FitPruneSelector()
        else:
            from ... import lvprune  # noqa: F401 (registers "lvprune" with the core's method registry)
            from ...core.methods import build_method

            schedule, selector = build_method(
                method, recipe=recipe, reduction_ratio=reduction_ratio, model=self, num_text_tokens=num_text_tokens,
                num_visual_tokens=getattr(self.get_vision_tower(), "num_patches", None), **(method_options or {}))
        self.model.recipe = schedule  # immutable (a frozen Recipe): what was checked is what runs
        self.model.selector = selector
        self.config.fitprune_recipe = schedule.to_dict() if schedule is not None else None
        self.config.fitprune_method = selector.name
        self.config.fitprune_method_options = selector_options(selector)

    # -- checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """transformers' `from_pretrained`, plus: a vision tower given relative to the checkpoint
        (`mm_vision_tower`) is opened there, whatever the working directory."""
        if config is None:  # loaded here (with the hub arguments) so the tower path can be resolved first
            hub = {k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs}
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub)
        elif isinstance(config, PretrainedConfig):
            config = copy.deepcopy(config)
        given = resolve_vision_tower(config, pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        model.vision_tower_given = given or getattr(model, "vision_tower_given", None)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, plus: refused when the selector cannot be restored (see
        checkpoint.py); the vision tower path stays relative when it resolves inside `save_directory`."""
        if self.model.recipe is not None:
            refuse_unrestorable(self.model.selector)
        in_use = getattr(self.config, "mm_vision_tower", None)
        self.config.mm_vision_tower = tower_path_for_save(self.config, getattr(self, "vision_tower_given", None),
                                                          save_directory)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.mm_vision_tower = in_use

    @property
    def recipe(self) -> Optional[Recipe]:
        return self.model.recipe

    @property
    def last_trace(self) -> Optional[PruneTrace]:
        return self.model.last_trace

    def prepare_multimodal(self, input_ids, position_ids, attention_mask, past_key_values, labels, images,
                           image_sizes=None):
        """LLaVA's `prepare_inputs_labels_for_multimodal`, plus the visual-token mask it expanded.

        Text labels are marked (not IGNORE_INDEX) for the call, so the positions LLaVA fills with
        IGNORE_INDEX among the real tokens are exactly the image features it inserted.
        """
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            out = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
            return (*out, None)
        given_mask = attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        marked = torch.full_like(input_ids, 0) if labels is None else labels.masked_fill(labels == IGNORE_INDEX, _TEXT_LABEL)
        _, position_ids, attention_mask, past_key_values, inputs_embeds, new_labels = \
            self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, marked, images, image_sizes)
        real = attention_mask.bool()
        visual_mask = (new_labels == IGNORE_INDEX) & real  # [B, N]
        if labels is None:
            new_labels = None
        else:
            new_labels = new_labels.masked_fill(new_labels == _TEXT_LABEL, IGNORE_INDEX)
        if given_mask is None and bool(real.all()):
            attention_mask = None
        return None, position_ids, attention_mask, past_key_values, inputs_embeds, new_labels, visual_mask

    # Adapted from transformers==4.37.2 LlamaForCausalLM.forward and llava-torch==1.2.2.post1
    # LlavaLlamaForCausalLM.forward; changed: the visual mask is passed to the language model, and
    # labels follow the rows that survive pruning.
    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        images: Optional[torch.FloatTensor] = None,
        image_sizes: Optional[List[List[int]]] = None,
        return_dict: Optional[bool] = None,
        visual_mask: Optional[torch.Tensor] = None,  # ours
        selector: Optional[TokenSelector] = None,  # ours
        key_bias_hook: Optional[Callable] = None,  # ours: see FitPruneLlavaLlamaModel.forward
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        """LLaVA's forward. With `output_attentions=True`, `attentions[l]` is None at every layer that
        drops tokens in this call: such a layer computes only the rows its scores read, block by
        block, and never holds the full [B, H, N, N] map (layer_step.py); other layers return stock's.
        """
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels,
             visual_mask) = self.prepare_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True, visual_mask=visual_mask, selector=selector, key_bias_hook=key_bias_hook,
        )
        logits = self.lm_head(outputs.last_hidden_state).float()

        loss = None
        if labels is not None:
            trace = self.model.last_trace
            if trace is not None and trace.final_positions is not None:  # ours: labels of surviving rows
                labels = labels.gather(1, trace.final_positions).masked_fill(~trace.final_valid, IGNORE_INDEX)
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.config.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)

        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.past_key_values, outputs.hidden_states,
                                                   outputs.attentions) if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, inputs: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                 image_sizes: Optional[torch.Tensor] = None, **kwargs):
        """LLaVA's `generate` (returns only new tokens), plus: batches are left-padded after the image
        is expanded, and `past_key_values=` continues a cached conversation with text `inputs`
        (`attention_mask`, if given, covers the cached tokens too, starting with `cache.key_masks[0]`;
        without one, the cache's padding and all-real new tokens; the output holds `inputs` + new)."""
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        generate = partial(GenerationMixin.generate, self)
        if kwargs.get("past_key_values") is not None:
            if images is not None:
                raise ValueError("continuing from past_key_values takes text tokens only; pass images=None")
            attention_mask = continuation_mask(kwargs["past_key_values"], attention_mask, inputs)
            return generate(inputs, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        visual_mask = None
        if images is not None:
            (_, position_ids, attention_mask, _, inputs_embeds, _, visual_mask) = self.prepare_multimodal(
                inputs, position_ids, attention_mask, None, None, images, image_sizes=image_sizes)
            if attention_mask is not None and position_ids is None:
                inputs_embeds, attention_mask, visual_mask = to_left_padding(inputs_embeds, attention_mask, visual_mask)
        else:
            inputs_embeds = self.get_model().embed_tokens(inputs)
        return generate(position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                        visual_mask=visual_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        visual_mask = kwargs.pop("visual_mask", None)
        selector = kwargs.pop("selector", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)
        if not past_key_values:  # only the prefill sees the image
            inputs["visual_mask"] = visual_mask
        if selector is not None:
            inputs["selector"] = selector
        return inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        if isinstance(past_key_values, PrunedCache):
            past_key_values.reorder_cache(beam_idx)
            return past_key_values
        return LlamaForCausalLM._reorder_cache(past_key_values, beam_idx)


class FitPruneLlavaLlamaForCausalLM(PruningCausalLMMixin, LlavaLlamaForCausalLM):
    config_class = FitPruneLlavaConfig

    # Adapted from llava-torch==1.2.2.post1 llava/model/language_model/llava_llama.py
    # LlavaLlamaForCausalLM.__init__; changed: the language model class.
    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = FitPruneLlavaLlamaModel(config)  # ours
        self.pretraining_tp = config.pretraining_tp
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._init_pruning(config)  # ours


def to_left_padding(embeds: torch.Tensor, attention_mask: torch.Tensor, visual_mask: torch.Tensor):
    """Move each sample's padding to the left, keeping the order of its real tokens, so the last row is
    real: LLaVA pads on the right, or on the left when `config.tokenizer_padding_side` is "left".

    embeds: [B, N, D]; attention_mask, visual_mask: [B, N]
    """
    index = attention_mask.to(torch.int8).argsort(dim=-1, stable=True)  # [B, N]: padding first, in order
    embeds = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    return embeds, attention_mask.gather(1, index), visual_mask.gather(1, index)


AutoConfig.register("llava_fitprune", FitPruneLlavaConfig)
AutoModelForCausalLM.register(FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM)
