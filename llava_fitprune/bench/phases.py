"""The compile benchmarks' phases (scripts/compile_bench.py, scripts/hf_compile_bench.py): each phase a
fresh worker process on one inductor cache, so "cold" (the first, an empty cache) and "warm" (the next,
the cache the first left) compile as a new user's process would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable


def run_phases(phases: list[str], worker_cmd: Callable[[str], list[str]], cache_dir: str, threads: int,
               timeout: float) -> dict:
    """Run `worker_cmd(phase)` for each phase in turn with TORCHINDUCTOR_CACHE_DIR=cache_dir and
    OMP_NUM_THREADS=threads; the worker prints its result as JSON on its last stdout line.
    returns {phase: that result (or {"error": ...}) with the load average before and after and the
    process's seconds}."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS=str(threads))
    results = {}
    for phase in phases:
        load0 = os.getloadavg()
        print(f"{phase}: load average {load0[0]:.2f} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(worker_cmd(phase), env=env, stdout=subprocess.PIPE, timeout=timeout, text=True)
            out = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                {"error": f"worker exit {done.returncode}"}
        except subprocess.TimeoutExpired:
            out = {"error": f"timed out after {timeout:.0f} s"}
        out.update(load_avg_before=[round(x, 2) for x in load0], load_avg_after=[round(x, 2) for x in os.getloadavg()],
                   process_s=round(time.perf_counter() - t0, 1))
        results[phase] = out
    return results
