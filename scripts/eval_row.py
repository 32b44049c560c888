"""The eval-shaped row of scripts/gpu_check.sh (issue #25 item 5): what a TextVQA run at batch 1 costs.

Each question is one batch-1 prompt in LLaVA-1.5's TextVQA layout and exactly `--new-tokens` greedy
tokens (3: `min_new_tokens = max_new_tokens = 3`, no early stop), timed end to end (prefill and the
decode steps; the language model only: the vision tower and the tokenizer cost both rows the same and
are left out). Prompt lengths, seeded:
  before the image  --prompt-tokens (35: LLaVA-1.5's system prompt and "USER:")
  visual            --visual-tokens (576: CLIP ViT-L/336)
  after the image   uniform integer in [--text-min, --text-max] (20..40: the question, "Answer the
                    question using a single word or phrase." and "ASSISTANT:")
Rows, questions taken in turns (the same machine load on both):
  stock           LLaVA's own LlavaLlamaForCausalLM, its eager loop (what a user runs today)
  fitprune-fast   FitPrune at --ratio on the fast path (compiled prefill on CUDA, graphed decode)
Every question is timed, the first ones included (they hold the compile, and any recompile a new
prompt length makes). Projected run of --project questions = the measured questions' total + the rest
at the mean of the later half (the steady state). Goal: stock / fitprune-fast projected >= 2.5x.
Writes one JSON (version 1) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys

import torch

from llava_fitprune.utils import atomic
from llava_fitprune.adapters.llava.fast_path import FastPath, FastPathConfig
from llava_fitprune.bench.measure import EagerRunner, FastRunner, run_once
from llava_fitprune.bench.models import PromptLayout, build_lm, build_stock_lm, load_lm_config, make_inputs
from llava_fitprune.core.recipe import RecipeError, builtin_recipe, check_reduction_ratio
from llava_fitprune.core.selectors import FitPruneSelector

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GOAL = 2.5  # issue #25: the eval run at least 2.5x faster than stock LLaVA, compile included


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-v1.5-7b", help="a named config (random weights) or a checkpoint folder")
    p.add_argument("--width", type=int, default=None, help="scale the hidden size (random weights; smoke runs)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ratio", type=float, default=0.6, help="FitPrune's built-in recipe")
    p.add_argument("--prompt-tokens", type=int, default=35)
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-min", type=int, default=20)
    p.add_argument("--text-max", type=int, default=40)
    p.add_argument("--questions", type=int, default=24, help="questions measured per row")
    p.add_argument("--new-tokens", type=int, default=3)
    p.add_argument("--project", type=int, default=5000, help="questions of the projected run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    return p


def check_args(p, a) -> None:
    for name in ("questions", "new_tokens", "project", "visual_tokens", "text_min"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")
    if a.text_max < a.text_min:
        p.error(f"--text-max {a.text_max} < --text-min {a.text_min}: give a range low..high")
    if a.questions < 2:
        p.error(f"--questions {a.questions}: need at least 2 (a first, compiling question and a steady one)")
    if a.questions > a.project:
        p.error(f"--questions {a.questions} > --project {a.project}: measure fewer than the projected run")
    try:
        check_reduction_ratio(a.ratio)
    except RecipeError as e:
        p.error(str(e))
    if os.path.dirname(a.out) and not os.path.isdir(os.path.dirname(a.out)):
        p.error(f"--out {a.out}: folder {os.path.dirname(a.out)} does not exist; create it first")


def text_lengths(a) -> list[int]:
    """Tokens after the image, one per question: uniform in [text_min, text_max], seeded."""
    rng = random.Random(a.seed)
    return [rng.randint(a.text_min, a.text_max) for _ in range(a.questions)]


def projection(times: list[float], project: int) -> dict:
    """Measured total + the remaining questions at the later half's mean (the steady state)."""
    steady = statistics.fmean(times[len(times) // 2:])
    return dict(per_question_s=times, steady_s_per_question=steady, first_question_s=times[0],
                measured_total_s=sum(times), projected_s=sum(times) + (project - len(times)) * steady)


def inductor_cache() -> str:
    """Where inductor caches compiled graphs and whether it held anything when this run started."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = cache_dir()
    return f"{'warm' if os.path.isdir(path) and any(os.scandir(path)) else 'cold'} ({path})"


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    cache_state = inductor_cache()
    cfg, has_weights = load_lm_config(a.model, a.width, a.heads)
    lm = build_lm(a.model, cfg, has_weights, "sdpa", dtype, str(device), a.seed)
    stock = build_stock_lm(lm, "sdpa")
    lm.set_pruning(builtin_recipe(a.ratio), FitPruneSelector())
    fast = FastPath(lm, FastPathConfig())
    runners = {"stock": EagerRunner(stock, pruning=False), "fitprune-fast": FastRunner(fast)}
    lengths = text_lengths(a)
    times = {k: [] for k in runners}
    for i, n in enumerate(lengths):  # [1, 35 + 576 + n, D] per question, both rows on the same prompt
        embeds, visual = make_inputs(lm, PromptLayout(a.prompt_tokens, a.visual_tokens, n), 1, a.seed + i)
        for name, runner in runners.items():
            times[name].append(run_once(runner, embeds, visual, None, [a.new_tokens]).e2e_s)
    rows = {k: projection(v, a.project) for k, v in times.items()}
    compiled = fast.compiled_prefill
    rows["fitprune-fast"].update(
        prefill_compile_s=fast.prefill_compile_s, prefill_graphs=compiled.stats.graphs if compiled else 0,
        decode_compile_s=fast.stats["decode_compile_s"], graph_capture_s=fast.stats["graph_capture_s"],
        prefill_mode=fast.prefill_mode)
    speedup = rows["stock"]["projected_s"] / rows["fitprune-fast"]["projected_s"]
    result = dict(
        version=1, kind="eval_row", model=a.model, width=a.width, device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, dtype=a.dtype, ratio=a.ratio,
        layout=dict(prompt_tokens=a.prompt_tokens, visual_tokens=a.visual_tokens, text_tokens=lengths,
                    text_distribution=f"uniform integer in [{a.text_min}, {a.text_max}], seed {a.seed}"),
        new_tokens=a.new_tokens, questions=a.questions, project=a.project, rows=rows,
        projected_speedup=speedup, goal_speedup=GOAL, inductor_cache=cache_state, load_avg=os.getloadavg()[0])
    atomic.write_text(a.out, json.dumps(result, indent=1) + "\n")
    for name, r in rows.items():
        print(f"eval row {name}: {r['steady_s_per_question'] * 1e3:.1f} ms/question steady, first "
              f"{r['first_question_s']:.2f} s; {a.project} questions projected {r['projected_s'] / 60:.1f} min")
    print(f"eval row: fitprune-fast {speedup:.2f}x stock LLaVA over {a.project} questions, compile included "
          f"(goal >= {GOAL}x); wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
