"""The compile benchmarks' phases (scripts/compile_bench.py, scripts/hf_compile_bench.py): each phase a
fresh worker process on one inductor cache, so "cold" (the first, an empty cache) and "warm" (the next,
the cache the first left) compile as a new user's process would."""
from __future__ import annotations

import argparse
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


STEPS = ("fitprune-0.6", "fitprune-0.9", "fastv", "recipe", "dense")  # the settings a compile bench walks, in order


def bench_parser(description: str, repeats: int, json_path: str) -> argparse.ArgumentParser:
    """The compile benchmarks' command line (the worker's arguments hidden)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=repeats, help="timed prefills per row (0: no run-time rows)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list, in order, of {STEPS}")
    p.add_argument("--phases", default="cold,warm", help="cold, warm: a fresh process each")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    p.add_argument("--json", default=json_path)
    p.add_argument("--label", default="", help="what ran (e.g. 'before: main at 05ac5f1')")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--text-before", type=int, default=35)
    p.add_argument("--text-after", type=int, default=30)
    return p


def parse_bench_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, with `steps` a checked list."""
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {STEPS}")
    return args


def worker_cmd(script: str, args: argparse.Namespace, model_dir: str, repeats: int) -> list[str]:
    """The command of one phase's worker process (`script --worker` with the same settings)."""
    return [sys.executable, os.path.abspath(script), "--worker", "--model-dir", model_dir,
            "--backend", args.backend, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
            "--repeats", str(repeats), "--steps", ",".join(args.steps),
            "--text-before", str(args.text_before), "--text-after", str(args.text_after)]
