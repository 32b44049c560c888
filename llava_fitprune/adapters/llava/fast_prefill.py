"""A compiled prefill: the decoder layer loop under `torch.compile`, per model instance.

`compile_prefill(model)` replaces the `decoder_layers` method of this one model's language model
(an instance attribute; the class and every other model are untouched) by a `CompiledPrefill`, which
runs prefill calls through `torch.compile` and everything else (decode steps, `output_attentions`,
`output_hidden_states`, a key-bias hook, training) through the eager loop. The fast path
(fast_path.py) holds its own `CompiledPrefill` and installs it only while it runs a prefill; its
static cache does not enter the graph: the graph caches into a plain PrunedCache, which the static
cache copies into its buffers after the graph (`adopt_prefill`). Writing into the static buffers
inside the graph compiled twice as slowly (every buffer's capacity is one more symbol) for the
same copies.

What makes one compilation serve a whole benchmark:
- the loop reads no device value on the host: the plan (core/prefill_plan.py) is made before it, with
  one host read, and the loop reads only the plan's host ints that do not depend on the prompt's
  length (drop counts, the first visual row, the visual-token counts);
- the sequence length is dynamic (its dimensions are marked, `_mark_sequence_dynamic`): lengths
  inside the loop are derived from tensor shapes, so prompts of other lengths reuse the graph; the
  host ints the loop reads (drop counts) stay constants (`dynamic=False`), which keeps the graph's
  symbolic shapes simple enough for inductor to compile in minutes;
- the rotary table length the layers see is the table's cached length, a constant.
A new graph is made when what the loop reads changes: another recipe or number of visual tokens,
another position of the first visual token, batch size 1 versus more, padding, another method.
`prefill_compile_stats(model)` reports the calls and the seconds spent in calls that compiled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from .cache import PrunedCache


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


class CompiledPrefill:
    """`model`'s decoder layer loop, compiled for prefills: call it as the loop (`decoder_layers`'s
    arguments); decode steps, `output_attentions`, `output_hidden_states`, a key-bias hook and
    training run the eager loop. Made by `compile_prefill`, or held by the fast path (fast_path.py),
    which installs it only for its own prefills."""

    def __init__(self, model, backend: str = "inductor", dynamic: bool = False, mode=None, fullgraph: bool = True,
                 **options):
        self.lm = _language_model(model)
        self.eager = type(self.lm).decoder_layers.__get__(self.lm)  # the class's loop, bound to this model
        self.compiled = torch.compile(self.eager, backend=backend, dynamic=dynamic, mode=mode, fullgraph=fullgraph,
                                      **({"options": options} if options else {}))
        self.stats = PrefillCompileStats(backend=backend)

    def __call__(self, hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                 output_attentions=False, output_hidden_states=False, use_cache=True, key_bias_hook=None):
        prefill = cache is None or cache.get_seq_length(0) == 0
        if not prefill or output_attentions or output_hidden_states or key_bias_hook is not None or self.lm.training:
            return self.eager(hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                              output_attentions, output_hidden_states, use_cache, key_bias_hook)
        before, t0 = _graphs(), time.perf_counter()
        target = cache
        if hasattr(cache, "adopt_prefill"):  # a static cache: filled from a staging cache after the graph
            cache = PrunedCache()
            cache.padded = target.padded
        _mark_sequence_dynamic(hidden_states.shape[1], hidden_states, valid, position_ids, state)
        out = self.compiled(hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                            False, False, use_cache, None)
        if target is not cache:
            target.adopt_prefill(cache)
        seconds = time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.call_s.append(seconds)
        if _graphs() > before:
            self.stats.compiling_calls += 1
            self.stats.compile_s += seconds
        return out

    @contextlib.contextmanager
    def installed(self):
        """Run this model's forward with the compiled loop inside the block (and the eager one after)."""
        if "decoder_layers" in vars(self.lm):
            raise RuntimeError("another compiled prefill is installed on this model (compile_prefill)")
        self.lm.decoder_layers = self  # per instance: shadows the class's method for this model only
        try:
            yield
        finally:
            del self.lm.decoder_layers


def _mark_sequence_dynamic(seq_len: int, *roots) -> None:
    """The sequence dimension (the first after the batch of size `seq_len`) of the loop's tensors, the
    prune state's fields and what the selector prepared (e.g. the oracle's [P, B, N] index) is
    dynamic; nothing else is (`dynamic=False`: drop counts and other host ints stay constants of the
    graph, which keeps its symbolic shapes simple and its compilation short)."""
    if seq_len < 2:
        return
    values = list(roots)
    while values:
        value = values.pop()
        if isinstance(value, torch.Tensor):
            dims = [d for d in range(1, value.dim()) if value.shape[d] == seq_len]  # after the batch
            if dims:  # the first: [B, N, ...] (a hidden width equal to N stays static), [P, B, N]
                torch._dynamo.maybe_mark_dynamic(value, dims[0])
        elif isinstance(value, (tuple, list)):
            values.extend(value)
        elif isinstance(value, dict):
            values.extend(value.values())
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            values.extend(getattr(value, f.name) for f in dataclasses.fields(value))


def compile_prefill(model, backend: str = "inductor", dynamic: bool = False, mode=None, fullgraph: bool = True,
                    **options) -> CompiledPrefill:
    """Run `model`'s prefill layer loop under `torch.compile` from now on (this instance only).

    backend, mode, dynamic, fullgraph and `options` go to `torch.compile`; fullgraph=True (the
    default) makes a graph break inside the loop an error instead of a slow path.
    """
    lm = _language_model(model)
    if "decoder_layers" in vars(lm):
        raise RuntimeError("compile_prefill was already applied to this model")
    loop = CompiledPrefill(model, backend, dynamic, mode, fullgraph, **options)
    lm.decoder_layers = loop  # per instance: shadows the class's method for this model only
    lm.prefill_compile_stats = loop.stats
    return loop


def prefill_compile_stats(model) -> PrefillCompileStats:
    lm = _language_model(model)
    if not hasattr(lm, "prefill_compile_stats"):
        raise ValueError("compile_prefill was not applied to this model")
    return lm.prefill_compile_stats
