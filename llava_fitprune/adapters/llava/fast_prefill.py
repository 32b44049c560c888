"""A compiled prefill: the decoder layer loop under `torch.compile`, per model instance.

`compile_prefill(model)` replaces the `decoder_layers` method of this one model's language model
(an instance attribute; the class and every other model are untouched) by a wrapper that runs
prefill calls through `torch.compile` and everything else (decode steps, `output_attentions`,
`output_hidden_states`, a key-bias hook, training) through the eager loop.

What makes one compilation serve a whole benchmark:
- the loop reads no device value on the host: the plan (core/prefill_plan.py) is made before it, with
  one host read, and the loop reads only the plan's host ints that do not depend on the prompt's
  length (drop counts, the first visual row, the visual-token counts);
- the sequence length is dynamic (`dynamic=True`): lengths inside the loop are derived from
  tensor shapes, so prompts of other lengths reuse the graph;
- the rotary table length the layers see is the table's cached length, a constant.
A new graph is made when what the loop reads changes: another recipe or number of visual tokens,
another position of the first visual token, batch size 1 versus more, padding, another method.
`prefill_compile_stats(model)` reports the calls and the seconds spent in calls that compiled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class PrefillCompileStats:
    backend: str
    calls: int = 0  # compiled prefill calls
    compiling_calls: int = 0  # calls that made a new graph
    compile_s: float = 0.0  # wall time of the calls that compiled (compilation plus one run)
    call_s: list[float] = field(default_factory=list)


def _language_model(model):
    lm = model.get_model() if hasattr(model, "get_model") else model
    if not hasattr(lm, "decoder_layers"):
        raise TypeError(f"{type(model).__name__} has no pruning-aware decoder loop: load it with "
                        f"llava_fitprune's load_pretrained_model (or a FitPruneLlava* class)")
    return lm


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_prefill(model, backend: str = "inductor", dynamic: bool = True, mode=None, fullgraph: bool = True,
                    **options) -> None:
    """Run `model`'s prefill layer loop under `torch.compile` from now on (this instance only).

    backend, mode, dynamic, fullgraph and `options` go to `torch.compile`; fullgraph=True (the
    default) makes a graph break inside the loop an error instead of a slow path.
    """
    lm = _language_model(model)
    if "decoder_layers" in vars(lm):
        raise RuntimeError("compile_prefill was already applied to this model")
    eager = lm.decoder_layers  # the bound method of the class
    compiled = torch.compile(eager, backend=backend, dynamic=dynamic, mode=mode, fullgraph=fullgraph,
                             **({"options": options} if options else {}))
    stats = PrefillCompileStats(backend=backend)

    def decoder_layers(hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                       output_attentions=False, output_hidden_states=False, use_cache=True, key_bias_hook=None):
        prefill = cache is None or cache.get_seq_length(0) == 0
        if not prefill or output_attentions or output_hidden_states or key_bias_hook is not None or lm.training:
            return eager(hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                         output_attentions, output_hidden_states, use_cache, key_bias_hook)
        before, t0 = _graphs(), time.perf_counter()
        out = compiled(hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                       False, False, use_cache, None)
        seconds = time.perf_counter() - t0
        stats.calls += 1
        stats.call_s.append(seconds)
        if _graphs() > before:
            stats.compiling_calls += 1
            stats.compile_s += seconds
        return out

    lm.decoder_layers = decoder_layers  # per instance: shadows the class's method for this model only
    lm.prefill_compile_stats = stats


def prefill_compile_stats(model) -> PrefillCompileStats:
    lm = _language_model(model)
    if not hasattr(lm, "prefill_compile_stats"):
        raise ValueError("compile_prefill was not applied to this model")
    return lm.prefill_compile_stats
