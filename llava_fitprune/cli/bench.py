"""`llava-fitprune bench`: do pruned FLOPs turn into wall-clock time?

For a language model (a checkpoint, or a named config with random weights, optionally scaled in
width) and a set of recipes, measures per attention implementation and batch size:
  stock     LLaVA's own LlavaLlamaForCausalLM with the same weights, transformers' eager loop: the
            baseline a user has today
  dense     the unpruned model
  fitprune  the recipe with FitPrune's scoring
  oracle    the same schedule with the tokens given for free (the FitPrune run's dropped positions,
            replayed by OracleSelector: no scoring), the best a pruning layer can do
  prellm    the dense model on fewer visual tokens, as many as the recipe's average over layers
            (an equal-FLOPs stand-in for pruning before the LLM, VisionZip-style)
With --compile, dense, fitprune and oracle also run on the fast path ("-fast" rows: compiled
prefill into a static per-layer KV cache, CUDA-graphed or compiled decode; fast_path.py).
prefill latency, decode latency per token (cached, step by step), end-to-end latency for the
smallest and the largest --new-tokens, compile time (graph capture / compilation, in the rows'
first runs) and the graphs each row's compiled prefill made (0: it reused an earlier row's; the
header says whether inductor's cache was cold or warm), peak memory over a run, KV-cache bytes; FLOPs from flops.py; efficiency = speedup /
FLOPs ratio.
Writes a Markdown table, a CSV and a latency-vs-TFLOPs plot to --out-dir.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..utils import atomic
from ..adapters.llava.fast_path import DECODE_MODES, PREFILL_MODES, FastPath, FastPathConfig
from ..bench.measure import EagerRunner, FastRunner, run_once, summarize
from ..bench.models import (PromptLayout, RowSpec, available_attn_implementations, build_lm, build_stock_lm,
                           load_lm_config, make_inputs, row_specs)
from ..bench.report import add_figures_of_merit, markdown_table, plot_latency_vs_flops, write_csv
from .args import Parser, at_least, check_common, fail, output_dir
from .backend import require_backend
from ..core.flops import NAMED_SHAPES, LMShape, kv_cache_bytes
from ..core.recipe import RecipeError, builtin_recipe, check_reduction_ratio, load_recipe
from ..core.selectors import FitPruneSelector, OracleSelector

METHODS = ("stock", "dense", "fitprune", "oracle", "prellm")
DEFAULT_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TERA, _GIGA, _MILLI, _MB = 1e12, 1e9, 1e3, 2 ** 20


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llava-fitprune bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-v1.5-7b", help="a named config (random weights) or a checkpoint folder")
    p.add_argument("--width", type=int, default=None, help="scale the hidden size to this (random weights)")
    p.add_argument("--heads", type=int, default=None, help="attention heads after --width (default: keep head size)")
    p.add_argument("--reduction-ratio", nargs="*", type=float, default=None,
                   help=f"built-in LLaVA-1.5-7B recipes (default {' '.join(map(str, DEFAULT_RATIOS))} without --recipe)")
    p.add_argument("--recipe", nargs="*", default=[], help="recipe JSON files")
    p.add_argument("--prompt-tokens", type=int, default=35, help="text tokens before the image")
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=30, help="text tokens after the image")
    p.add_argument("--attn", nargs="*", default=None, help="attention implementations (default: all available)")
    p.add_argument("--batch-size", nargs="*", type=int, default=[1, 8])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--new-tokens", nargs="+", type=int, default=[8, 128],
                   help="tokens generated per run: the largest is decoded (decode timing), end-to-end time "
                        "is taken at the smallest and the largest")
    p.add_argument("--compile", action="store_true", help="also run dense, fitprune and oracle on the fast path")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="the fast path's decode step (auto: a CUDA graph on CUDA, eager elsewhere)")
    p.add_argument("--prefill", choices=PREFILL_MODES, default="auto",
                   help="the fast path's prefill: compile (the layer loop under torch.compile) or eager "
                        "(auto: fast_path.PREFILL_AUTO per device)")
    p.add_argument("--prefill-compile-mode", default=None, choices=[None, "reduce-overhead", "max-autotune"],
                   help="torch.compile mode of --prefill compile (reduce-overhead: CUDA graphs per prompt length)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of --decode compile and --prefill compile")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of every row first; the last one also measures peak memory")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every row, taken in turns")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--tag", default="bench", help="file name stem of the outputs in --out-dir")
    return p


def check_args(parser, args, argv=()) -> None:
    """Ranges, the shared options and the output folder, before any model is built."""
    if args.model not in NAMED_SHAPES and os.path.exists(args.model):  # a transformers-native one: .venv-hf
        require_backend(parser.prog, args.model, argv, "--model")
    at_least(parser, args, 1, "batch_size", "repeats", "new_tokens", "visual_tokens", "width", "heads")
    at_least(parser, args, 0, "warmup", "prompt_tokens", "text_tokens")
    if args.attn == [] or args.batch_size == []:
        fail(parser, "attn" if args.attn == [] else "batch_size", "(none)", "give at least one value, or leave it out")
    if os.sep in args.tag or args.tag in ("", ".", ".."):
        fail(parser, "tag", repr(args.tag), "a file name stem, not a path: put the folder in --out-dir")
    check_common(parser, args)
    output_dir(parser, args, "out_dir")


def _recipes(args, num_layers: int, parser):
    try:
        recipes = [load_recipe(p) for p in args.recipe]
        ratios = args.reduction_ratio if args.reduction_ratio is not None else ([] if recipes else DEFAULT_RATIOS)
        recipes += [builtin_recipe(check_reduction_ratio(r)) for r in ratios]
        for r in recipes:
            r.check_model(num_layers)
    except RecipeError as e:
        parser.error(str(e))
    return recipes


def machine_summary(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"CPU {cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}){gpu}; "
            f"torch {torch.__version__}, python {platform.python_version()}")


def _row_dict(spec, attn, batch, timing, shape: LMShape, dtype: torch.dtype, new_tokens: list[int], row) -> dict:
    layers = spec.kv_lengths
    if timing.kv_lengths and timing.kv_lengths != layers:
        print(f"warning: {spec.method} {spec.ratio}: cache lengths {timing.kv_lengths} differ from the schedule "
              f"{layers}", file=sys.stderr)
    return dict(
        attn=attn, batch=batch, method=spec.method, ratio=spec.ratio, visual_tokens=spec.layout.visual_tokens,
        avg_tokens_per_layer=sum(layers) / len(layers), prefill_tflops=spec.prefill_flops / _TERA,
        flops_reduction=spec.flops_reduction, prefill_ms=timing.prefill_s * _MILLI,
        decode_ms_per_token=timing.decode_s_per_token * _MILLI,
        decode_cpu_ms_per_token=timing.decode_cpu_s_per_token * _MILLI,
        decode_gflops_per_token=spec.decode_flops / _GIGA,
        e2e_ms=timing.e2e_s * _MILLI, e2e_short_ms=timing.e2e_short_s * _MILLI, short_new_tokens=min(new_tokens),
        compile_s=row.compile_s, compile_graphs=row.compile_graphs, cold_e2e_ms=row.cold_e2e_s * _MILLI,
        peak_mem_mb=timing.peak_mem_bytes / _MB, kv_bytes=timing.kv_bytes,
        kv_bytes_predicted=kv_cache_bytes(shape, layers, dtype.itemsize, batch),
        new_tokens=max(new_tokens), repeats=timing.repeats, load_avg=timing.load_avg, prefill_runs=timing.prefill_runs,
        prefill_cpu_ms=timing.prefill_cpu_s * _MILLI, prefill_cpu_runs=timing.prefill_cpu_runs,
    )


@dataclass
class _Row:
    spec: RowSpec
    embeds: torch.Tensor  # [B, N, D]
    visual: torch.Tensor  # [B, N] bool
    runner: object = None
    runs: list = field(default_factory=list)
    peak: int = 0
    compile_s: float = 0.0  # the fast path's compilation / graph capture, summed over the row's runs
    compile_graphs: int = 0  # graphs its compiled prefill made (0: reused what an earlier row compiled)
    cold_e2e_s: float = float("nan")  # the row's first run (warm-up or not)


def _dropped_positions(lm, recipe, embeds, visual) -> list:
    """The positions FitPrune drops at each layer for these inputs (one untimed prefill)."""
    lm.set_pruning(recipe, FitPruneSelector())
    with torch.inference_mode():
        lm(inputs_embeds=embeds, visual_mask=visual, use_cache=True)
    return list(lm.get_model().last_trace.dropped_positions)


def _runner(spec: RowSpec, lm, stock, args):
    if spec.base == "stock":
        return EagerRunner(stock, pruning=False)
    if spec.fast:  # each fast row its own state: its cache buffers (and CUDA graph) persist across its runs
        return FastRunner(FastPath(lm, FastPathConfig(args.decode, args.compile_backend, prefill=args.prefill,
                                                      prefill_backend=args.compile_backend,
                                                      prefill_compile_mode=args.prefill_compile_mode)))
    return EagerRunner(lm)


def _compile_seconds(runner) -> float:
    if not isinstance(runner, FastRunner):
        return 0.0
    stats = runner.fast.stats
    return stats["decode_compile_s"] + stats["graph_capture_s"] + runner.fast.prefill_compile_s


def _inductor_cache_state() -> str:
    """'; inductor cache cold/warm (DIR)': whether compiled graphs can be loaded instead of compiled."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = cache_dir()
    warm = os.path.isdir(path) and any(os.scandir(path))
    return f"; inductor cache {'warm' if warm else 'cold'} ({path})"


def _compile_graphs(runner) -> int:
    prefill = runner.fast.compiled_prefill if isinstance(runner, FastRunner) else None
    return prefill.stats.graphs if prefill is not None else 0


def run_group(lm, stock, attn: str, batch: int, specs, layout, args, shape, dtype, bar) -> list[dict]:
    """All rows of one (attention implementation, batch size), their runs taken in turns: warm-up
    runs of every row, then repeat after repeat of every row (so machine load hits all rows alike)."""
    embeds, visual = make_inputs(lm, layout, batch, args.seed)
    rows = [_Row(s, *((embeds, visual) if s.method != "prellm" else make_inputs(lm, s.layout, batch, args.seed)),
                 runner=_runner(s, lm, stock, args)) for s in specs]
    positions = {}  # ratio -> FitPrune's dropped positions, from its latest run (it runs before the oracle)
    tracked = max(args.warmup - 1, 0)  # the run whose peak memory is kept: the last warm-up (if any)
    for i in range(args.warmup + args.repeats):
        for row in rows:
            spec = row.spec
            bar.set_postfix_str(f"{attn} B={batch} {spec.method} {spec.ratio:g}" + (" warm-up" if i < args.warmup else ""))
            lm.set_pruning(spec.recipe if spec.base == "fitprune" else None, FitPruneSelector())
            selector = None
            if spec.base == "oracle":
                if spec.ratio not in positions:  # no FitPrune row for this ratio
                    positions[spec.ratio] = _dropped_positions(lm, spec.recipe, embeds, visual)
                    lm.set_pruning(None)
                selector = OracleSelector(positions[spec.ratio])
            compiled_before, graphs_before = _compile_seconds(row.runner), _compile_graphs(row.runner)
            run = run_once(row.runner, row.embeds, row.visual, selector, args.new_tokens, track_memory=i == tracked)
            row.compile_s += _compile_seconds(row.runner) - compiled_before
            row.compile_graphs += _compile_graphs(row.runner) - graphs_before
            if i == 0:
                row.cold_e2e_s = run.e2e_s
            if spec.base == "fitprune":
                positions[spec.ratio] = list(lm.get_model().last_trace.dropped_positions)
            if i == tracked:
                row.peak = run.peak_mem_bytes
            if i >= args.warmup:
                row.runs.append(run)
                bar.update(1)
    lm.set_pruning(None)
    return [_row_dict(r.spec, attn, batch, summarize(r.runs, r.peak), shape, dtype, args.new_tokens, r) for r in rows]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        cfg, has_weights = load_lm_config(args.model, args.width, args.heads)
    except ValueError as e:
        parser.error(str(e))
    shape = LMShape.from_config(cfg)
    recipes = _recipes(args, shape.num_layers, parser)
    attns = args.attn or available_attn_implementations(device.type)
    layout = PromptLayout(args.prompt_tokens, args.visual_tokens, args.text_tokens)

    header = (f"model {args.model}{'' if has_weights else ' (random weights)'}: {shape.num_layers} layers, "
              f"hidden {shape.hidden_size}, MLP {shape.intermediate_size}, heads {shape.num_heads}/"
              f"{shape.num_kv_heads}; prompt {layout.prompt_tokens} + {layout.visual_tokens} visual + "
              f"{layout.text_tokens} text; {dtype} on {device}; {' and '.join(map(str, sorted(set(args.new_tokens))))} "
              f"new tokens; {'fast path prefill ' + args.prefill + ', decode ' + args.decode + '; ' if args.compile else ''}warm-up "
              f"{args.warmup}, median of {args.repeats}{_inductor_cache_state() if args.compile else ''}\n"
              f"{machine_summary(device)}")
    print(header)
    plan = {b: row_specs(shape, layout, recipes, args.methods, b, max(args.new_tokens), args.compile)
            for b in args.batch_size}
    total = len(attns) * sum(len(s) for s in plan.values()) * args.repeats
    rows = []
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr) as bar:
        for attn in attns:
            lm = build_lm(args.model, cfg, has_weights, attn, dtype, str(device), args.seed)
            stock = build_stock_lm(lm, attn) if "stock" in args.methods else None
            for batch, specs in plan.items():
                rows += run_group(lm, stock, attn, batch, specs, layout, args, shape, dtype, bar)
            del lm, stock
            gc.collect()

    add_figures_of_merit(rows)
    table = markdown_table(rows)
    print(table)
    stem = os.path.join(args.out_dir, args.tag)
    write_csv(rows, stem + ".csv")
    atomic.write_text(stem + ".md", header + "\n\n" + table + "\n")
    plot_latency_vs_flops(rows, stem + ".png", title=header.splitlines()[0])
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
