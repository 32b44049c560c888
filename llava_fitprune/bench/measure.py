"""Timing and memory of one benchmark row: prefill, step-by-step cached decoding, peak memory.

A run is a prefill and then `new_tokens - 1` decode steps with the model's own cache
(`past_key_values`; the fast path: its static cache and step), the first new token coming from the
prefill's logits; the prefill time, the
decode time per token and the end-to-end time come from the same run. bench.py takes the rows'
runs in turns (round robin), so a row and the one it is compared with see the same machine load,
and reports medians.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch


_SAMPLE_S = 0.002  # RSS sampling period when the kernel's peak counter cannot be reset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float:
    """1-minute load average (the CPU is shared: recorded with every row)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# -- peak memory --------------------------------------------------------------------------------
def _rss_bytes(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def _release_free_heap() -> None:
    """Give the C heap's free pages back (glibc `malloc_trim`), so the next block's allocations show
    up in RSS instead of reusing pages freed earlier. It makes that block page-fault its memory,
    which is why the tracked run is a warm-up run."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block above what was allocated before it, in bytes.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs) minus the RSS before, after the heap's free pages were released; where
    that reset is not allowed, RSS sampled by a thread every few milliseconds.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.peak = 0
        self._sampler: Optional[threading.Thread] = None

    def __enter__(self):
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._base = _rss_bytes()
        self._hwm = _reset_peak_rss()
        if not self._hwm:
            self._stop = threading.Event()
            self._max = self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(_SAMPLE_S)

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm:
            self.peak = _rss_bytes("VmHWM") - self._base
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = self._max - self._base
        return False



# -- one run ------------------------------------------------------------------------------------
@dataclass
class Run:
    prefill_s: float
    prefill_cpu_s: float  # CPU time of this process (all its threads) during the prefill
    decode_s_per_token: float
    decode_cpu_s_per_token: float  # CPU time of this process per decode step (robust to a loaded machine)
    e2e_s: float  # prefill and every decode step (the largest new-token count)
    e2e_short_s: float  # prefill and the steps of the smallest new-token count
    peak_mem_bytes: int  # 0 when not tracked
    kv_bytes: int
    kv_lengths: list[int]
    load_avg: float  # 1-minute load average right after the run


@dataclass
class Timing:
    """Medians over the timed runs of one row (and the runs themselves, for paired ratios)."""

    prefill_s: float
    decode_s_per_token: float
    decode_cpu_s_per_token: float
    e2e_s: float
    e2e_short_s: float
    peak_mem_bytes: int
    kv_bytes: int
    kv_lengths: list[int]
    prefill_runs: list[float]
    load_avg: float
    prefill_cpu_runs: list[float]

    @property
    def prefill_cpu_s(self) -> float:
        return statistics.median(self.prefill_cpu_runs)

    @property
    def repeats(self) -> int:
        return len(self.prefill_runs)


def cache_stats(cache) -> tuple[int, list[int]]:
    """(bytes of the cached keys and values, tokens per layer) of a transformers cache or legacy tuple."""
    if hasattr(cache, "layers"):  # transformers 5.x: one layer object per decoder layer
        layers = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        layers = list(cache)  # [(k [B, KV, K_l, hd], v), ...]
    return sum(t.numel() * t.element_size() for kv in layers for t in kv), [k.shape[-2] for k, _ in layers]


class EagerRunner:
    """A model's own forward: the prefill, then one cached step per token (ours or stock LLaVA's)."""

    def __init__(self, lm, pruning: bool = True):
        self.lm, self.pruning = lm, pruning
        self.embed = lm.get_model().embed_tokens

    def prefill(self, embeds, visual_mask, selector, max_new_tokens: int):
        extra = dict(visual_mask=visual_mask, selector=selector) if self.pruning else {}
        out = self.lm(inputs_embeds=embeds, use_cache=True, return_dict=True, **extra)
        return out.logits[:, -1], out.past_key_values

    def step(self, ids, cache):
        """ids: [B] -> (logits [B, V], cache)"""
        out = self.lm(inputs_embeds=self.embed(ids)[:, None], past_key_values=cache, use_cache=True, return_dict=True)
        return out.logits[:, -1], out.past_key_values


class FastRunner:
    """The fast path (fast_path.py): prefill into a static cache, fixed-shape decode steps."""

    def __init__(self, fast):
        self.fast = fast

    def prefill(self, embeds, visual_mask, selector, max_new_tokens: int):
        out = self.fast.prefill(max_new_tokens, inputs_embeds=embeds, visual_mask=visual_mask, selector=selector)
        return out.logits[:, -1], out.past_key_values

    def step(self, ids, cache):
        return self.fast.decode(ids[:, None], None, cache)[:, -1], cache


def run_once(runner, embeds: torch.Tensor, visual_mask: Optional[torch.Tensor], selector, new_tokens: list[int],
             track_memory: bool = False) -> Run:
    """One prefill and `max(new_tokens) - 1` greedy cached decode steps (the first new token is the
    prefill's); the end-to-end time is also taken after `min(new_tokens)` tokens.

    embeds: [B, N, D]; visual_mask: [B, N] bool or None (dense: nothing to prune)
    """
    device = embeds.device
    steps, short = max(max(new_tokens) - 1, 0), min(new_tokens)
    with torch.inference_mode():
        with PeakMemory(device, enabled=track_memory) as track:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            logits, cache = runner.prefill(embeds, visual_mask, selector, max(new_tokens))
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            kv_bytes, kv_lengths = cache_stats(cache)  # untimed
            t_decode, c_decode = time.perf_counter(), time.process_time()
            t_short = t_decode
            for i in range(steps):
                logits, cache = runner.step(logits.argmax(-1), cache)
                if i + 2 == short:  # i + 2 tokens so far: the prefill's and i + 1 steps
                    sync(device)
                    t_short = time.perf_counter()
            sync(device)
            t2, c2 = time.perf_counter(), time.process_time()
    prefill_s = t1 - t0
    per_token = (t2 - t_decode) / steps if steps else float("nan")
    cpu_per_token = (c2 - c_decode) / steps if steps else float("nan")
    return Run(prefill_s, c1 - c0, per_token, cpu_per_token, prefill_s + t2 - t_decode,
               prefill_s + t_short - t_decode, track.peak, kv_bytes, kv_lengths, load_average())


def summarize(runs: list[Run], peak_mem_bytes: int) -> Timing:
    med = statistics.median
    return Timing(med(r.prefill_s for r in runs), med(r.decode_s_per_token for r in runs),
                  med(r.decode_cpu_s_per_token for r in runs), med(r.e2e_s for r in runs),
                  med(r.e2e_short_s for r in runs), peak_mem_bytes, runs[-1].kv_bytes, runs[-1].kv_lengths,
                  [r.prefill_s for r in runs], med(r.load_avg for r in runs), [r.prefill_cpu_s for r in runs])
