"""The transformers backend's fast path: its prefill through compiled regions, one graph per kind of
decoder-layer step for every layer (the LLaVA backend's adapters/llava/layer_regions.py).

`enable_fast_path(model, backend="inductor", mode=None, **options)` (or `load_pretrained(...,
compile=True)`) gives one model instance a `HFCompiledPrefill`: from then on its prefills (pruned or
dense) run the pruning decoder loop with each layer through compiled regions

    stock_step(layer, hidden [B,N,D], cos, sin [B,N,hd], mask [B,1,N,N] | None) -> hidden, k, v
    pruning_step(layer, hidden, cos, sin, mask, row_start, weights, visual, keep [n], importance_fn, rows)
        -> hidden [B,n,D], k, v, index [B,n], order [B,N], kept rows (cos, sin and the prune state's fields)
    pruning_attention_step(layer, hidden, cos, sin, mask, row_start, scores, weights) -> out [B,N,H*hd], k, v, scores
    pruning_output_step(layer, out, hidden, cos, sin, index [B,n]) -> hidden [B,n,D], cos, sin [B,n,hd]

the design of the LLaVA backend's compiled prefill (adapters/llava/fast_prefill.py, whose `Region`,
statistics, dynamic marks, scores kinds, `pruning_step` plumbing and first-compile lock this module
reuses): parameters are graph inputs (one graph serves every layer), the sequence dimensions are
marked dynamic (every layer, prompt length, ratio and recipe reuses the graph), drop counts are never
graph constants (FitPrune and uniform select inside `pruning_step`, the kept length a dynamic size;
other selectors run eagerly between the attention and output regions; cache writes run eagerly).
Graph constants (guards): row_start (the first visual row), the scores kind (none: random / oracle;
row_sums: FitPrune, uniform; probs: FastV), padding (a mask or none), batch size 1 or more, dtype,
device. So a FitPrune model compiles 2 graphs; another ratio, recipe or uniform none; fastv two,
random one.
Qwen2.5-VL's M-RoPE (cos, sin) rows are made once per prefill by the model's rotary embedding and
gathered with the kept tokens inside the output region.

Decode steps, `output_attentions` / `output_hidden_states` and training run the eager loop (or the
stock forward when dense). A region whose compilation fails runs eagerly from then on after one
warning line; the answer is still produced. `model.fitprune_compile_stats` (a PrefillCompileStats)
counts calls, graphs made and the seconds of the calls that compiled.
"""
from __future__ import annotations

from typing import Optional

from ..llava.fast_prefill import (CompiledPrefill, PrefillCompileStats, compiled_regions, counted_call,
                                  region_options, regional_loop)

# model types whose text layers the regions implement (Llama / Qwen2 decoder layers, standard rotary)
COMPILED_MODEL_TYPES = ("llava", "llava_next", "qwen2_5_vl")


class HFCompiledPrefill:
    """The compiled regions of one transformers model instance, and their statistics."""

    def __init__(self, backend="inductor", mode=None, **options):
        self.stats = PrefillCompileStats(backend=backend if isinstance(backend, str) else getattr(
            backend, "__name__", repr(backend)))
        self.failed: Optional[str] = None  # why compiling failed: every region runs eagerly then
        self.regions = compiled_regions(self, backend, mode, options)  # the LLaVA backend's regions

    fail = CompiledPrefill.fail  # one warning line, then every region runs eagerly (the LLaVA backend's)

    def layers(self, text_model, hidden_states, cos, sin, valid, cache, padded, plan, prune, selector, trace):
        """The decoder layers of a prefill (the cache, if any, is empty), timed and counted.
        hidden_states: [B, N, D]; cos, sin: [B, N, hd]; valid: [B, N] bool. returns (hidden [B, N_L, D], valid)."""
        return counted_call(self.stats, regional_layers, text_model, self.regions, hidden_states, cos, sin, valid,
                            cache, padded, plan, prune, selector, trace)


def regional_layers(text_model, regions: dict, hidden_states, cos, sin, valid, cache, padded, plan, prune, selector,
                    trace):
    """The pruning decoder loop of a prefill (decoder.py's, layer by layer through `regions`: the LLaVA
    backend's `regional_loop`). prune: the PruneState (None: nothing drops).
    returns (hidden [B, N_L, D], valid [B, N_L])."""
    hidden_states, valid, records = regional_loop(text_model.layers, regions, hidden_states, cos, sin, valid, cache,
                                                  padded, plan, prune, selector)
    if trace is not None:
        trace.dropped_positions.extend(None if r is None else r.positions() for r in records)
    return hidden_states, valid


def enable_fast_path(model, backend="inductor", mode=None, **options) -> PrefillCompileStats:
    """Run the prefills of `model` (loaded by `load_pretrained` or given `enable_pruning`) through
    compiled regions from now on (this instance only); `backend`, `mode` and `options` go to
    `torch.compile` for every region. Returns the statistics (also `model.fitprune_compile_stats`)."""
    text = getattr(model, "fitprune_text_model", None)
    if text is None or not hasattr(text, "fitprune"):
        raise TypeError(f"{type(model).__name__} has no pruning decoder loop: load it with "
                        f"llava_fitprune.adapters.hf.load_pretrained (or call enable_pruning first)")
    if model.config.model_type not in COMPILED_MODEL_TYPES:
        raise NotImplementedError(f"the compiled prefill supports {COMPILED_MODEL_TYPES}; "
                                  f"{model.config.model_type!r} runs eagerly (load it with compile=False)")
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(f"the compiled prefill supports full-attention layers only; this model's layer "
                                  f"types: {sorted(set(layer_types))} (e.g. use_sliding_window=False)")
    text.fitprune.compiled = HFCompiledPrefill(backend, mode, **region_options(model.device, backend, options))
    return text.fitprune.compiled.stats


def disable_fast_path(model) -> None:
    """Back to the eager prefill (the compiled graphs are dropped with the regions)."""
    model.fitprune_text_model.fitprune.compiled = None
