"""A compiled prefill by regions: each kind of decoder-layer step is compiled once, for every layer.

`CompiledPrefill(model)` (held by the fast path, fast_path.py, and installed only while one of its
prefills runs; or `compile_prefill(model)` for every prefill of this one instance) replaces the
model's `decoder_layers` loop, for prefills, by `regional_layers`: the same loop in Python, whose
layers call four compiled regions (layer_regions.py):

    stock_step(layer, hidden [B,N,D], cos, sin [B,N,hd], mask [B,1,N,N] | None) -> hidden, k, v
    pruning_step(layer, hidden, cos, sin, mask, row_start, weights [B,N,C], visual [B,N], keep [n],
                 importance_fn, rows) -> hidden [B,n,D], k, v, index [B,n], order [B,N], kept rows
    pruning_attention_step(layer, hidden, cos, sin, mask, row_start, scores, weights) -> out [B,N,H*hd], k, v, scores
    pruning_output_step(layer, out, hidden, cos, sin, index [B,n]) -> hidden [B,n,D], cos, sin [B,n,hd]

The interface (also for a port to another backend, e.g. adapters/hf): a region is a pure function of
(layer module, tensors, a few host values that are the same for every layer of a prefill); it
returns tensors and writes nothing. Everything that differs between layers or recipes is data:
- the layer: its parameters are graph inputs (`inline_inbuilt_nn_modules`, torch's default), so one
  graph serves the 32 layers; the guards check the parameters' shapes, dtypes and devices only;
- lengths: the sequence dimensions (N, and n after a pruning layer) are marked dynamic
  (`maybe_mark_dynamic`) on every call, so every layer, prompt length, ratio and recipe reuses the
  graph; nothing else is dynamic (`dynamic=False`): widths, heads and the batch size stay constants;
- drop counts: never a graph constant. A selector whose importance is a pure function of the head-max
  map's row sums (FitPrune, uniform: `TokenSelector.row_sums_importance`), when every sample drops the
  same count, runs inside `pruning_step`: the kept length enters as the size of `keep` (marked
  dynamic), the score rows are summed in causal blocks (never a [B, R, N] map), the two sorts, the
  kept rows of the hidden states, the rotary rows and the prune state's fields are taken in the
  graph. Any other selector (FastV's probabilities, random, the oracle, LVPruning, unequal counts in
  a padded batch) runs eagerly between `pruning_attention_step` and `pruning_output_step`, from the
  scores the first returns. The cache writes (`extend_key_mask`, `update`) run eagerly, straight into
  a static cache (no staging copy).
Host values that are graph constants (guards): `row_start` (the first visual row: a new prompt
template makes new pruning graphs), `scores` (none / row_sums / head_max / probs: one
pruning-attention graph per kind of selector), the selector's importance function, the fields the
prune state gathers, whether a mask is given (padding), the batch size being 1 or more, grad mode,
the dtype and the device. So a FitPrune model compiles 2 graphs (stock, pruning step); a switch to
another ratio, recipe or uniform none; to fastv two (its attention step, the output step); random or
the oracle one (an attention step without scores). On a CPU inductor also writes the graphs' wrapper
in C++ (`region_options`).

Reliability: a region whose compilation fails (an inductor error, a truncated file in inductor's
on-disk cache, a backend that raises) runs eagerly from then on (the regions are pure, so the
call is simply repeated eagerly), after one warning line; the answer is still produced. The first
compiling prefill of a process holds a file lock in inductor's cache directory, so processes that
share it (eval chunks: scripts/v1_5/eval/_common.sh) compile one after the other and all but the
first load the graphs from the cache.
`prefill_compile_stats(model)` reports the calls, the graphs made and the seconds spent in calls
that compiled.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import layer_regions
from ...core.selectors import DropRecord, TokenSelector
from .layer_step import TailAttention, attention_mask_4d


@dataclass
class PrefillCompileStats:
    backend: str
    calls: int = 0  # compiled prefill calls
    compiling_calls: int = 0  # calls that made a new graph
    graphs: int = 0  # graphs the regions made (dynamo's unique graphs during these calls)
    compile_s: float = 0.0  # wall time of the calls that compiled (compilation plus one run)
    call_s: list[float] = field(default_factory=list)
    eager_regions: list[str] = field(default_factory=list)  # the region whose compilation failed (then all eager)


def _language_model(model):
    lm = model.get_model() if hasattr(model, "get_model") else model
    if not hasattr(lm, "decoder_layers"):
        raise TypeError(f"{type(model).__name__} has no pruning-aware decoder loop: load it with "
                        f"llava_fitprune's load_pretrained_model (or a FitPruneLlava* class)")
    return lm


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Region:
    """One compiled region: `fn` under `torch.compile` (fullgraph, static but for the dims marked
    dynamic). After a failed compilation of any region of its `owner` (a CompiledPrefill), every
    region runs `fn` itself: the owner warns once."""

    def __init__(self, fn: Callable, owner: "CompiledPrefill", backend, mode=None, options: Optional[dict] = None):
        self.fn = fn
        self.owner = owner
        self.compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=False, fullgraph=True,
                                      **({"options": options} if options else {}))

    def __call__(self, *args):
        if self.owner.failed is not None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler; eager repeats a real error
            self.owner.fail(self.fn.__name__, e)
            return self.fn(*args)


def compiled_regions(owner, backend, mode, options: dict) -> dict:
    """The four regions (layer_regions.py) under `torch.compile`, owned by `owner` (its `fail` makes
    them all eager): {"stock", "attention", "output", "step"}."""
    return {name: Region(fn, owner, backend, mode, options) for name, fn in (
        ("stock", layer_regions.stock_step), ("attention", layer_regions.pruning_attention_step),
        ("output", layer_regions.pruning_output_step), ("step", layer_regions.pruning_step))}


def region_options(device, backend, options: dict) -> dict:
    """inductor's options for the regions: on a CPU, a C++ wrapper around the kernels (`cpp_wrapper`)
    unless the caller says otherwise. A pruning region launches a few dozen kernels (the score rows in
    blocks); their Python wrapper cost about 0.15 ms a call, a fifth of a late layer (BENCHMARKS.md,
    "Compile time"). Other devices keep inductor's default (not measured there yet)."""
    if backend == "inductor" and torch.device(device).type == "cpu":
        return {"cpp_wrapper": True, **options}
    return dict(options)


def _dynamic(t: Optional[torch.Tensor], *dims: int) -> Optional[torch.Tensor]:
    """Mark the sequence dimensions `dims` of `t` dynamic (sizes 0 and 1 stay specialised)."""
    if t is not None:
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)
    return t


def scores_kind(selector) -> str:
    """What a pruning attention step returns for `selector` (layer_regions.SCORES)."""
    if not selector.needs_attention:
        return "none"
    if selector.reads_row_sums:
        return "row_sums"
    return "head_max" if selector.reads_head_max else "probs"


def row_weights(selector, scores: str, state):
    """The selector's row weights [B, N, C] the attention region sums with (scores "row_sums"), else None."""
    return _dynamic(selector.row_weights(state), 1) if scores == "row_sums" else None




def counted_call(stats: PrefillCompileStats, run: Callable, *args):
    """`run(*args)`, a compiled prefill's layers (either backend), timed and counted into `stats`; the
    first call of a process holds the inductor cache's file lock (`_first_compile_lock`)."""
    with _first_compile_lock(stats.calls == 0):
        before, t0 = _graphs(), time.perf_counter()
        out = run(*args)
        seconds, made = time.perf_counter() - t0, _graphs() - before
    stats.calls += 1
    stats.call_s.append(seconds)
    if made:
        stats.compiling_calls += 1
        stats.graphs += made
        stats.compile_s += seconds
    return out

def one_region(selector, step) -> bool:
    """Whether a pruning layer runs as one region (layer_regions.pruning_step): the selector's importance
    is a pure function of the row sums (`row_sums_importance`), its `keep_rows` is the base one, and
    every sample drops the same count. Else the attention and output regions, the selection between."""
    return (selector.reads_row_sums and selector.row_sums_importance is not None and step.equal
            and type(selector).keep_rows is TokenSelector.keep_rows)


def kept_length(n: int, device) -> torch.Tensor:
    """[n], marked dynamic: a pruning step's kept length as a size (never a graph constant)."""
    return _dynamic(torch.empty(n, dtype=torch.bool, device=device), 0)


def pruning_step(region, layer, hidden_states, cos, sin, mask, r0: int, selector, state, step):
    """A pruning layer as one region (`one_region`; either backend's layer_regions.pruning_step), the prune
    state following its kept rows. hidden_states: [B, N, D]; cos, sin: [B, N, hd].
    returns (hidden [B, n, D], k, v [B, KV, N, hd], (cos, sin) [B, n, hd], record)."""
    state.n_visual = step.n_visual
    names = state.gathered(selector.tracked)
    rows = [cos, sin] + [_dynamic(getattr(state, name), 1) for name in names]  # [B, N, ...] each
    record = DropRecord(state.orig_pos, state.valid, count=step.max_drop)
    hidden_states, k, v, index, record.order, rows = region(
        layer, hidden_states, cos, sin, mask, r0, row_weights(selector, "row_sums", state), _dynamic(state.visual, 1),
        kept_length(step.new_len, hidden_states.device), selector.row_sums_importance, rows)  # hidden: [B, n, D]
    state.set_rows(names, rows[2:], None, selector.tracked)
    return hidden_states, k, v, (_dynamic(rows[0], 1), _dynamic(rows[1], 1)), record


def pruning_layer(regions: dict, layer, layer_idx: int, hidden_states, cos, sin, mask, r0: int, scores: str, selector,
                  state, step):
    """A pruning layer of either backend's regional loop: one region (`one_region`: attention, selection,
    output and the gathers) or the attention and output regions with the selection between them; the
    prune state follows the kept rows. hidden_states: [B, N, D]; cos, sin: [B, N, hd].
    returns (hidden [B, n, D], k, v [B, KV, N, hd], (cos, sin) [B, n, hd], record)."""
    if one_region(selector, step):
        return pruning_step(regions["step"], layer, hidden_states, cos, sin, mask, r0, selector, state, step)
    out, k, v, extra = regions["attention"](layer, hidden_states, cos, sin, mask, r0, scores,
                                            row_weights(selector, scores, state))
    index, kept, record = select_rows(selector, layer_idx, extra, scores, r0, state, hidden_states, step)  # [B, n]
    hidden_states, cos, sin = regions["output"](layer, _dynamic(out, 1), hidden_states, cos, sin, _dynamic(index, 1))
    state.gather(index, kept, selector.tracked)
    return hidden_states, k, v, (_dynamic(cos, 1), _dynamic(sin, 1)), record


def select_rows(selector, layer_idx: int, extra, scores: str, r0: int, state, hidden_states, step):
    """The selection between a pruning layer's two compiled regions (both backends' regional loops): the
    scores the attention region returned (`extra`: row sums [B, C, W], head-max [B, R, N] or probabilities
    [B, H, R, N] of rows r0..N-1, or None) handed to the selector as its LayerAttention.
    returns (index [B, n], kept, record)."""
    attention = None
    if scores != "none":
        attention = TailAttention(None, None, r0, None)
        if scores == "row_sums":
            attention._row_sums = extra  # [B, C, W]
        elif scores == "head_max":
            attention._head_max = extra  # [B, R, N]
        else:
            attention._probs = extra  # [B, H, R, N]
    state.n_visual = step.n_visual
    return selector.keep_rows(layer_idx, attention, state, hidden_states, step)


def regional_layers(lm, regions: dict, hidden_states, valid, position_ids, cache, padded, plan, state, selector,
                    trace, use_cache=True):
    """`decoder_layers` of a prefill (the cache, if any, is empty), each layer through the compiled
    regions in `regions` ({"stock", "step", "attention", "output"}: Region or plain functions).
    hidden_states: [B, N, D] -> ([B, N_L, D], None, None)."""
    rope = lm.layers[0].self_attn.rotary_emb  # every layer's table is the same (RopeTable: long enough)
    cos_table, sin_table = rope(hidden_states, seq_len=lm.rope_span.length)  # [P, hd]
    # the rows' rotary rows [B, N, hd], taken with the kept rows from then on
    hidden_states, _, records = regional_loop(lm.layers, regions, hidden_states, cos_table[position_ids],
                                              sin_table[position_ids], valid, cache, padded, plan, state, selector,
                                              use_cache)
    if plan is not None:
        trace.records.extend(records)
    return hidden_states, None, None


def regional_loop(layers, regions: dict, hidden_states, cos, sin, valid, cache, padded, plan, state, selector,
                  use_cache=True):
    """Both backends' prefill layer loop through compiled regions (the cache, if any, is empty).
    hidden_states: [B, N, D]; cos, sin: [B, N, hd] the rows' rotary rows; valid: [B, N] bool; plan, state:
    the prefill plan and PruneState (None: nothing drops). returns (hidden [B, N_L, D], valid [B, N_L],
    the DropRecord of each layer, None where it drops nothing)."""
    cos, sin = _dynamic(cos, 1), _dynamic(sin, 1)
    mask, mask_key = None, None
    scores = scores_kind(selector)
    records = []
    for layer_idx, layer in enumerate(layers):
        N = hidden_states.shape[1]
        key_mask = cache.extend_key_mask(layer_idx, valid) if cache is not None else valid  # [B, N]
        if padded and mask_key is not key_mask:
            mask_key = key_mask
            mask = _dynamic(attention_mask_4d(key_mask, N, 0, hidden_states.dtype, "eager", True), 2, 3)
        _dynamic(hidden_states, 1)
        step = plan.steps.get(layer_idx) if plan is not None and state is not None else None
        if step is None:
            hidden_states, k, v = regions["stock"](layer, hidden_states, cos, sin, mask)
            record = None
        else:
            hidden_states, k, v, (cos, sin), record = pruning_layer(regions, layer, layer_idx, hidden_states, cos,
                                                                    sin, mask, min(state.row_start, N), scores,
                                                                    selector, state, step)
            valid = state.valid
        if cache is not None and use_cache:
            cache.update(k, v, layer_idx)
        records.append(record)
    return hidden_states, valid, records


@contextlib.contextmanager
def _first_compile_lock(enabled: bool):
    """A file lock in inductor's cache directory around a process's first compiled prefill: processes
    sharing the cache compile one at a time, the later ones load what the first wrote."""
    if not enabled:
        yield
        return
    try:
        import fcntl

        from torch._inductor.runtime.cache_dir_utils import cache_dir

        os.makedirs(cache_dir(), exist_ok=True)
        f = open(os.path.join(cache_dir(), "llava_fitprune-prefill.lock"), "a")
    except (ImportError, OSError):  # no lock here (another OS, a read-only cache): compile unlocked
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CompiledPrefill:
    """`model`'s decoder layer loop for prefills, through compiled regions (module docstring): call it
    as the loop (`decoder_layers`'s arguments); decode steps, `output_attentions`,
    `output_hidden_states`, a key-bias hook and training run the eager loop. Made by
    `compile_prefill`, or held by the fast path (fast_path.py), which installs it only for its own
    prefills. backend, mode and `options` go to `torch.compile` for every region."""

    def __init__(self, model, backend="inductor", mode=None, **options):
        self.lm = _language_model(model)
        self.eager = type(self.lm).decoder_layers.__get__(self.lm)  # the class's loop, bound to this model
        self.stats = PrefillCompileStats(backend=backend if isinstance(backend, str) else getattr(
            backend, "__name__", repr(backend)))
        self.failed: Optional[str] = None  # why compiling failed: every region runs eagerly then
        self.regions = compiled_regions(self, backend, mode, region_options(model.device, backend, options))

    def fail(self, region: str, error: Exception) -> None:
        """A region failed to compile (or to load from inductor's cache): warn once, run eagerly from now on."""
        root = error
        while root.__cause__ is not None or getattr(root, "inner_exception", None) is not None:  # the compiler's own error
            root = root.__cause__ or root.inner_exception
        lines = str(root).strip().splitlines()
        self.failed = f"{region}: {type(root).__name__}: {lines[0] if lines else ''}"[:300]
        self.stats.eager_regions.append(region)
        warnings.warn(f"llava_fitprune: the compiled prefill failed ({self.failed}); the prefill runs eagerly "
                      f"from now on (same results, not compiled)", RuntimeWarning, stacklevel=3)

    def __call__(self, hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                 output_attentions=False, output_hidden_states=False, use_cache=True, key_bias_hook=None):
        prefill = cache is None or cache.get_seq_length(0) == 0
        if not prefill or output_attentions or output_hidden_states or key_bias_hook is not None or self.lm.training:
            return self.eager(hidden_states, valid, position_ids, cache, padded, plan, state, selector, trace,
                              output_attentions, output_hidden_states, use_cache, key_bias_hook)
        return counted_call(self.stats, regional_layers, self.lm, self.regions, hidden_states, valid, position_ids,
                            cache, padded, plan, state, selector, trace, use_cache)

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


def compile_prefill(model, backend="inductor", mode=None, **options) -> CompiledPrefill:
    """Run `model`'s prefill layers through compiled regions from now on (this instance only).
    backend, mode and `options` go to `torch.compile`."""
    lm = _language_model(model)
    if "decoder_layers" in vars(lm):
        raise RuntimeError("compile_prefill was already applied to this model")
    loop = CompiledPrefill(model, backend, mode, **options)
    lm.decoder_layers = loop  # per instance: shadows the class's method for this model only
    lm.prefill_compile_stats = loop.stats
    return loop


def prefill_compile_stats(model) -> PrefillCompileStats:
    lm = _language_model(model)
    if not hasattr(lm, "prefill_compile_stats"):
        raise ValueError("compile_prefill was not applied to this model")
    return lm.prefill_compile_stats
