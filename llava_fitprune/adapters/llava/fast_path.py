"""The fast path: a static per-layer KV cache and a compiled / CUDA-graphed decode step, per model.

`enable_fast_path(model)` changes one model instance (its `forward` and `generate`), never a class:
inside `generate` (greedy or sampling, one beam) the prefill writes into a StaticPrunedCache sized
for the prompt plus room for new tokens (at most `max_new_tokens`, grown by doubling: static_cache.py),
and every one-token step runs `StaticDecoder` over fixed buffers: on CUDA replayed as a CUDA graph
(captured on the first step of a cache), elsewhere eager or under `torch.compile`. Any other call
(labels, attentions, beams, images on a decode step, a call with positional arguments) takes the
model's own forward; the eager loop can also read and
extend a StaticPrunedCache, so a cached second turn works on both paths. A new conversation reuses
the buffers of the last cache only once nobody holds it (`BufferPool`): a cache you keep can always
be continued; a cache whose `generate` call raised is released.

The prefill: the model's forward, whose layers run through compiled regions when the prefill mode
is "compile" (fast_prefill.CompiledPrefill, installed for the fast path's own prefills only: one
graph per kind of layer step, dynamic lengths, drop counts as data). The forward allocates every
layer's buffers before the loop (`StaticPrunedCache.prepare_prefill`, from the plan's per-layer
lengths); the regions return each layer's keys and values, written eagerly into those buffers.
"""
from __future__ import annotations

import inspect
import time
import types
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .modeling import PruningCausalLMMixin
from .fast_prefill import CompiledPrefill
from .modeling_mistral import FitPruneLlavaMistralForCausalLM
from .static_buffers import BufferPool
from .static_cache import DEFAULT_BUCKET, StaticPrunedCache, round_up
from .static_decode import StaticDecoder, decode_layer, rotary_tables

DECODE_MODES = ("auto", "eager", "compile", "graph")
PREFILL_MODES = ("auto", "eager", "compile")
# per device type: on the CPU a compiled prefill gains a few percent for minutes of compilation
# (BENCHMARKS.md, "Fast path"); on a GPU it removes the launches that bind a batch-1 prefill
PREFILL_AUTO = {"cuda": "compile", "cpu": "eager"}


@dataclass
class FastPathConfig:
    decode: str = "auto"  # auto: "graph" on CUDA, "eager" elsewhere (BENCHMARKS.md: compile does not win on CPU)
    backend: str = "inductor"  # torch.compile backend for decode="compile" (tests: "eager" / "aot_eager")
    bucket: int = DEFAULT_BUCKET  # cache capacities are rounded up to this many tokens
    reuse_buffers: bool = True  # a new conversation reuses the last cache's buffers once nobody holds it
    prefill: str = "auto"  # "compile", "eager" (the model's own loop) or "auto" (per device: PREFILL_AUTO)
    prefill_backend: str = "inductor"  # torch.compile backend of prefill="compile"
    # torch.compile mode of the prefill: None (inductor's default: fused kernels, launched from the host)
    # or "reduce-overhead" (CUDA graphs, one recorded per prompt length; untested on a GPU so far)
    prefill_compile_mode: Optional[str] = None

    def check(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")
        if self.bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {self.bucket}")


@dataclass
class _Graph:
    key: tuple
    graph: "torch.cuda.CUDAGraph"
    input_ids: torch.Tensor  # [B, 1] static inputs the graph reads
    position_ids: torch.Tensor  # [B, 1]
    logits: torch.Tensor  # [B, 1, V] the graph's output


class FastPath:
    """Per-model state of the fast path. Made by `enable_fast_path`."""

    def __init__(self, model, config: FastPathConfig):
        config.check()
        self.model = model
        self.config = config
        device = model.device
        mode = config.decode
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"decode='graph' needs a CUDA model, this one is on {device}: use 'compile' or 'eager'")
        self.mode = mode
        layer_step = (torch.compile(decode_layer, backend=config.backend, fullgraph=True, dynamic=False)
                      if mode == "compile" else decode_layer)
        self.decoder = StaticDecoder(model, layer_step)
        self.original_forward = types.MethodType(type(model).forward, model)
        self.original_generate = types.MethodType(type(model).generate, model)
        self.prefill_mode = PREFILL_AUTO.get(device.type, "eager") if config.prefill == "auto" else config.prefill
        self.compiled_prefill = (CompiledPrefill(model, config.prefill_backend, mode=config.prefill_compile_mode)
                                 if self.prefill_mode == "compile" else None)
        self.max_new_tokens: Optional[int] = None  # set while `generate` runs
        self.pool = BufferPool()  # the newest cache's buffers, for the next conversation (static_buffers.py)
        self.stats = {"decode_compile_s": 0.0, "graph_captures": 0, "graph_capture_s": 0.0}
        self._tables: Optional[tuple] = None  # (length, cos [P, hd], sin [P, hd])
        self._graph: Optional[_Graph] = None
        self._compiled_keys: set = set()

    @property
    def prefill_compile_s(self) -> float:
        """Seconds spent in prefill calls that compiled a new graph (0 with an eager prefill)."""
        return self.compiled_prefill.stats.compile_s if self.compiled_prefill is not None else 0.0

    # -- caches ------------------------------------------------------------------------------------
    def new_cache(self, extra_tokens: int) -> StaticPrunedCache:
        """A cache for a new conversation, on the buffers of the last one if nobody holds that (or it
        was released): a cache someone holds is never overwritten (BufferPool)."""
        reuse = self.pool.take() if self.config.reuse_buffers else None
        cache = StaticPrunedCache(extra_tokens, self.config.bucket, reuse=reuse,
                                  context_length=getattr(self.model.config, "max_position_embeddings", None))
        if self.config.reuse_buffers:
            self.pool.keep(cache)
        return cache

    def prefill(self, max_new_tokens: int, **forward_kwargs) -> CausalLMOutputWithPast:
        """The model's forward on a prompt (keyword arguments), caching into a new StaticPrunedCache
        with room for `max_new_tokens` more tokens."""
        cache = self.new_cache(max_new_tokens)
        forward_kwargs.update(past_key_values=cache, use_cache=True, return_dict=True)
        try:
            if self.compiled_prefill is None:
                return self.original_forward(**forward_kwargs)
            with self.compiled_prefill.installed():  # this call's layer loop only: other forwards stay eager
                return self.original_forward(**forward_kwargs)
        except BaseException:
            cache.release()  # never returned: its buffers go to the next conversation
            raise

    def _rotary(self, needed: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None or self._tables[0] < needed or self._tables[1].dtype != dtype:
            length = max(round_up(needed, 1024), getattr(self.model.config, "max_position_embeddings", 0) or 0)
            self._tables = (length, *rotary_tables(self.model, length, dtype, device))
        return self._tables[1], self._tables[2]

    def _check_window(self, cache: StaticPrunedCache) -> None:
        window = getattr(self.model.config, "sliding_window", None)
        if isinstance(self.model, FitPruneLlavaMistralForCausalLM) and window is not None \
                and cache.seen_tokens + 1 > window:
            raise NotImplementedError(f"sequence of {cache.seen_tokens + 1} tokens exceeds Mistral's sliding "
                                      f"window {window}, which the pruning model does not apply")

    # -- one decode step ---------------------------------------------------------------------------
    def decode(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
               cache: StaticPrunedCache) -> torch.Tensor:
        """input_ids: [B, 1]; position_ids: [B, 1] or None (then the cache's unpruned length, as the
        eager loop). Writes one token into every layer of `cache`; returns logits [B, 1, V] float32."""
        self._check_window(cache)
        fill = cache.prepare_step()  # [L]
        B = input_ids.shape[0]
        if position_ids is None:
            position_ids = torch.full((B, 1), cache.seen_tokens, dtype=torch.long, device=input_ids.device)
        cos, sin = self._rotary(cache.seen_tokens + 2, cache.key_buffers[0].dtype, input_ids.device)
        args = (cache.key_buffers, cache.value_buffers, cache.mask_buffers, fill, cos, sin)
        if self.mode == "graph":
            logits = self._graph_step(input_ids, position_ids, args)
        elif self.mode == "compile":
            key = (B, tuple(tuple(b.shape) for b in cache.mask_buffers))
            t0 = time.perf_counter()
            logits = self.decoder(input_ids, position_ids, *args)
            if key not in self._compiled_keys:  # the first call of a shape compiles
                self._compiled_keys.add(key)
                self.stats["decode_compile_s"] += time.perf_counter() - t0
        else:
            logits = self.decoder(input_ids, position_ids, *args)
        cache.advance()
        return logits

    def _graph_step(self, input_ids, position_ids, args) -> torch.Tensor:
        key = graph_key(input_ids, args)
        g = self._graph
        if g is not None and g.key == key:
            g.input_ids.copy_(input_ids)
            g.position_ids.copy_(position_ids)
            g.graph.replay()
            return g.logits.clone()
        # a new cache layout: this step runs eagerly (the warm-up, on a side stream), then is captured
        t0 = time.perf_counter()
        self._graph = None  # frees the old graph's memory pool
        stream = torch.cuda.Stream(device=input_ids.device)
        stream.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(stream):
            logits = self.decoder(input_ids, position_ids, *args)
        torch.cuda.current_stream(input_ids.device).wait_stream(stream)
        static_ids, static_pos = input_ids.clone(), position_ids.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the buffers and `fill` are left as they are
            out = self.decoder(static_ids, static_pos, *args)
        self._graph = _Graph(key, graph, static_ids, static_pos, out)
        self.stats["graph_captures"] += 1
        self.stats["graph_capture_s"] += time.perf_counter() - t0
        return logits

    # -- the model's forward and generate, per instance ----------------------------------------------
    def forward(self, *args, **kwargs):
        past = kwargs.get("past_key_values")
        static = isinstance(past, StaticPrunedCache)
        eager_only = (args or kwargs.get("labels") is not None or kwargs.get("output_attentions")
                      or kwargs.get("output_hidden_states") or kwargs.get("use_cache") is False
                      or kwargs.get("key_bias_hook") is not None)
        if eager_only or not (static or (self.max_new_tokens is not None and past is None)):
            return self.original_forward(*args, **kwargs)
        ids = kwargs.get("input_ids")
        if static and kwargs.get("inputs_embeds") is None and ids is not None and ids.shape[1] == 1 \
                and kwargs.get("images") is None:
            logits = self.decode(ids, kwargs.get("position_ids"), past)
            if kwargs.get("return_dict") is False:
                return logits, past
            return CausalLMOutputWithPast(logits=logits, past_key_values=past)
        if past is None:
            return self.prefill(self.max_new_tokens, **kwargs)
        past.extra_tokens = self.max_new_tokens or 0  # a cached continuation: the eager loop appends
        return self.original_forward(**kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        gen = self.model.generation_config
        if (kwargs.get("num_beams") or gen.num_beams) > 1 or kwargs.get("output_attentions") \
                or kwargs.get("output_hidden_states") or kwargs.get("use_cache", True) is False:
            return self.original_generate(*args, **kwargs)
        max_new = kwargs.get("max_new_tokens") or gen.max_new_tokens or kwargs.get("max_length") or gen.max_length
        before, self.max_new_tokens = self.max_new_tokens, int(max_new)
        newest = self.pool.owner()
        try:
            return self.original_generate(*args, **kwargs)
        except BaseException:  # e.g. a stopping criterion raised mid-decode
            made = self.pool.owner()
            if made is not None and made is not newest:  # this call's cache, never handed out: released,
                made.release()  # its buffers go to the next conversation; an earlier cache stays usable
            raise
        finally:
            self.max_new_tokens = before


def graph_key(input_ids: torch.Tensor, step_args: tuple) -> tuple:
    """What a captured decode step depends on: the batch and the addresses and shapes of every tensor
    it reads or writes besides its inputs (buffers, masks, `fill`, the rotary tables): freed buffers'
    addresses can come back with other shapes."""
    keys, values, masks, fill, cos, sin = step_args
    return (tuple(input_ids.shape), str(input_ids.device),
            tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in (*keys, *values, *masks)),
            fill.data_ptr(), cos.data_ptr(), sin.data_ptr())


def enable_fast_path(model, decode: str = "auto", backend: str = "inductor", bucket: int = DEFAULT_BUCKET,
                     reuse_buffers: bool = True, prefill: str = "auto", prefill_backend: str = "inductor",
                     prefill_compile_mode: Optional[str] = None) -> FastPath:
    """Turn on the fast path for this model instance (see the module docstring); returns its state,
    also at `model.fast_path`. `disable_fast_path(model)` turns it off.

    decode: "graph" (CUDA graphs), "compile" (`backend`) or "eager"; prefill: "compile" (the layer loop
    under torch.compile with `prefill_backend`) or "eager"; "auto" picks per device (DECODE / PREFILL_AUTO)."""
    if not isinstance(model, PruningCausalLMMixin):
        raise TypeError(f"the fast path needs the pruning model (load_pretrained_model), got {type(model).__name__}")
    if getattr(model.config, "pretraining_tp", 1) > 1:
        raise NotImplementedError("pretraining_tp > 1 is not supported by the fast path")
    disable_fast_path(model)
    fast = FastPath(model, FastPathConfig(decode, backend, bucket, reuse_buffers, prefill, prefill_backend,
                                          prefill_compile_mode))
    model.forward = _with_signature(fast.forward, fast.original_forward)  # per instance: the class is untouched
    model.generate = _with_signature(fast.generate, fast.original_generate)
    model.fast_path = fast
    return fast


def _with_signature(method, like):
    """`method`, showing `like`'s signature (generate checks its kwargs against the forward's)."""
    def call(*args, **kwargs):
        return method(*args, **kwargs)

    call.__signature__ = inspect.signature(like)
    call.__doc__ = like.__doc__
    return call


def disable_fast_path(model) -> None:
    for name in ("forward", "generate", "fast_path"):
        model.__dict__.pop(name, None)
