"""`llava-fitprune bench` in .venv-hf: do pruned FLOPs turn into wall-clock time on a transformers-native VLM?

    llava-fitprune bench --model CHECKPOINT --recipe RECIPE.json [--random-weights] ...

The language model of a transformers-native checkpoint (llava-hf, LLaVA-NeXT, Qwen2.5-VL, ...: the hf
backend's families), its own weights or random ones of its config (--random-weights: config.json
alone), fed layer-0 inputs (random embeddings with the embedding table's spread, the visual block
after --prompt-tokens) through the hf backend's pruning loop, per attention implementation and batch:
  dense     the unpruned model (the stock transformers forward)
  fitprune  the recipe with FitPrune's scoring
  oracle    the same schedule with FitPrune's dropped positions given for free (OracleSelector)
The vision tower is not run (it costs the same with and without pruning). Timing, memory and the
figures of merit are the LLaVA backend's (bench/measure.py, bench/report.py); Markdown, CSV and a
plot go to --out-dir. LLaVA-only rows (stock LLaVA, prellm, the --compile fast path) are refused.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..bench.measure import run_once, summarize
from ..bench.models import PromptLayout, row_specs
from ..bench.report import add_figures_of_merit, markdown_table, plot_latency_vs_flops, write_csv
from ..core.flops import LMShape, kv_cache_bytes
from ..core.recipe import RecipeError, builtin_recipe, check_reduction_ratio, load_recipe
from ..core.selectors import FitPruneSelector, OracleSelector
from ..utils import atomic
from .args import Parser, at_least, check_common, fail, output_dir
from .backend import require_backend

METHODS = ("dense", "fitprune", "oracle")
LLAVA_ONLY = {"stock": "stock LLaVA is the LLaVA backend's model", "prellm": "prellm is LLaVA-backend only"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TERA, _GIGA, _MILLI, _MB = 1e12, 1e9, 1e3, 2 ** 20


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llava-fitprune bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers-native checkpoint folder")
    p.add_argument("--random-weights", action="store_true", help="random weights of the checkpoint's config")
    p.add_argument("--recipe", nargs="*", default=[], help="recipe JSON files (llava-fitprune fit)")
    p.add_argument("--reduction-ratio", nargs="*", type=float, default=None,
                   help="built-in LLaVA-1.5-7B recipes (32-layer models only)")
    p.add_argument("--prompt-tokens", type=int, default=35, help="text tokens before the image")
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=30, help="text tokens after the image")
    p.add_argument("--attn", nargs="*", default=["sdpa"], help="attention implementations (eager, sdpa)")
    p.add_argument("--batch-size", nargs="*", type=int, default=[1])
    p.add_argument("--methods", nargs="*", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--new-tokens", nargs="+", type=int, default=[8, 32])
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--tag", default="bench-hf")
    return p


def check_args(parser, args, argv) -> None:
    """Everything before a weight loads: the checkpoint's backend and family, LLaVA-only options, ranges."""
    if not os.path.exists(args.model):
        fail(parser, "model", args.model, "no such checkpoint folder: pass a transformers-native checkpoint (named "
                                          "shapes with random weights are the LLaVA backend's: .venv)")
    require_backend(parser.prog, args.model, argv, "--model")
    if args.compile:
        fail(parser, "compile", "", "the fast path is LLaVA-backend only: leave --compile out")
    for m in args.methods:
        if m in LLAVA_ONLY:
            fail(parser, "methods", m, f"{LLAVA_ONLY[m]}: choose from {', '.join(METHODS)}")
        if m not in METHODS:
            fail(parser, "methods", m, f"unknown method: choose from {', '.join(METHODS)}")
    for a in args.attn:
        if a not in ("eager", "sdpa"):
            fail(parser, "attn", a, "the hf bench runs eager or sdpa")
    at_least(parser, args, 1, "batch_size", "repeats", "new_tokens", "visual_tokens")
    at_least(parser, args, 0, "warmup", "prompt_tokens", "text_tokens")
    if os.sep in args.tag or args.tag in ("", ".", ".."):
        fail(parser, "tag", repr(args.tag), "a file name stem, not a path: put the folder in --out-dir")
    check_common(parser, args)
    output_dir(parser, args, "out_dir")


def build_model(args, attn: str, dtype, device):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..adapters.hf import enable_pruning

    if args.random_weights:
        torch.manual_seed(args.seed)
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation=attn)
    return enable_pruning(model.to(device).eval())


class HfRunner:
    """The hf backend's text model and LM head, fed layer-0 inputs: the prefill, then one cached step per token.
    The visual mask goes where the VLM's forward puts it (the text model's `fitprune.pending_visual`)."""

    def __init__(self, model):
        self.model, self.text = model, model.fitprune_text_model
        self.embed = self.text.get_input_embeddings()

    def _logits(self, out):
        return self.model.lm_head(out.last_hidden_state[:, -1]), out.past_key_values  # [B, V]

    def prefill(self, embeds, visual_mask, selector, max_new_tokens: int):
        self.text.fitprune.pending_visual = visual_mask
        return self._logits(self.text(inputs_embeds=embeds, use_cache=True))

    def step(self, ids, cache):
        """ids: [B] -> (logits [B, V], cache)"""
        return self._logits(self.text(inputs_embeds=self.embed(ids)[:, None], past_key_values=cache, use_cache=True))


def make_inputs(model, layout: PromptLayout, batch: int, seed: int):
    """Random embeddings with the embedding table's spread: ([B, N, D], visual mask [B, N] bool)."""
    emb = model.fitprune_text_model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layout.total, emb.shape[1], generator=gen) * emb.float().std().item()
    visual = torch.zeros(batch, layout.total, dtype=torch.bool)
    visual[:, layout.prompt_tokens: layout.prompt_tokens + layout.visual_tokens] = True
    return x.to(device=emb.device, dtype=emb.dtype), visual.to(emb.device)


def run_group(model, attn, batch, specs, layout, args, shape, dtype) -> list[dict]:
    """The rows of one (attention, batch), their runs in turns (warm-ups first) so load hits them alike."""
    embeds, visual = make_inputs(model, layout, batch, args.seed)
    runner, runs, peaks, positions = HfRunner(model), {i: [] for i in range(len(specs))}, {}, {}
    tracked = max(args.warmup - 1, 0)
    for i in range(args.warmup + args.repeats):
        for k, spec in enumerate(specs):
            if spec.method == "oracle":
                if spec.ratio not in positions:  # no FitPrune row for this ratio: one untimed FitPrune prefill
                    model.set_pruning(spec.recipe)
                    runner.prefill(embeds, visual, None, 1)
                    positions[spec.ratio] = list(model.fitprune_trace.dropped_positions)
                model.set_pruning(spec.recipe, selector=OracleSelector(positions[spec.ratio]))
            else:
                model.set_pruning(spec.recipe, selector=FitPruneSelector() if spec.recipe is not None else None)
            run = run_once(runner, embeds, visual if spec.recipe is not None else None, None, args.new_tokens,
                           track_memory=i == tracked)
            if spec.method == "fitprune":
                positions[spec.ratio] = list(model.fitprune_trace.dropped_positions)
            if i == tracked:
                peaks[k] = run.peak_mem_bytes
            if i >= args.warmup:
                runs[k].append(run)
    model.set_pruning(None)
    return [row_dict(spec, attn, batch, summarize(runs[k], peaks.get(k, 0)), shape, dtype, args.new_tokens)
            for k, spec in enumerate(specs)]


def row_dict(spec, attn, batch, timing, shape: LMShape, dtype, new_tokens) -> dict:
    layers = spec.kv_lengths
    if timing.kv_lengths != layers:  # the cache must hold what the schedule says: else the row is wrong
        raise RuntimeError(f"{spec.method} {spec.ratio}: cache lengths {timing.kv_lengths} differ from the "
                           f"schedule {layers}")
    return dict(attn=attn, batch=batch, method=spec.method, ratio=spec.ratio, visual_tokens=spec.layout.visual_tokens,
                avg_tokens_per_layer=sum(layers) / len(layers), prefill_tflops=spec.prefill_flops / _TERA,
                flops_reduction=spec.flops_reduction, prefill_ms=timing.prefill_s * _MILLI,
                decode_ms_per_token=timing.decode_s_per_token * _MILLI,
                decode_cpu_ms_per_token=timing.decode_cpu_s_per_token * _MILLI,
                decode_gflops_per_token=spec.decode_flops / _GIGA, e2e_ms=timing.e2e_s * _MILLI,
                e2e_short_ms=timing.e2e_short_s * _MILLI, short_new_tokens=min(new_tokens), compile_s=0.0,
                cold_e2e_ms=float("nan"), peak_mem_mb=timing.peak_mem_bytes / _MB, kv_bytes=timing.kv_bytes,
                kv_bytes_predicted=kv_cache_bytes(shape, layers, dtype.itemsize, batch), new_tokens=max(new_tokens),
                repeats=timing.repeats, load_avg=timing.load_avg, prefill_runs=timing.prefill_runs,
                prefill_cpu_ms=timing.prefill_cpu_s * _MILLI, prefill_cpu_runs=timing.prefill_cpu_runs)


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
    from transformers import AutoConfig

    shape = LMShape.from_config(AutoConfig.from_pretrained(args.model).get_text_config(decoder=True))
    try:
        recipes = [load_recipe(p) for p in args.recipe]
        recipes += [builtin_recipe(check_reduction_ratio(r)) for r in args.reduction_ratio or []]
        for r in recipes:
            r.check_model(shape.num_layers)
    except RecipeError as e:
        parser.error(str(e))
    if not recipes and set(args.methods) - {"dense"}:
        parser.error(f"no recipe: pass --recipe RECIPE.json (fit one for this {shape.num_layers}-layer model with "
                     f"llava-fitprune fit)")
    layout = PromptLayout(args.prompt_tokens, args.visual_tokens, args.text_tokens)
    header = (f"model {args.model}{' (random weights)' if args.random_weights else ''} (transformers backend): "
              f"{shape.num_layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, heads "
              f"{shape.num_heads}/{shape.num_kv_heads}; prompt {layout.prompt_tokens} + {layout.visual_tokens} visual "
              f"+ {layout.text_tokens} text; {dtype} on {device}; {max(args.new_tokens)} new tokens; warm-up "
              f"{args.warmup}, median of {args.repeats}; torch {torch.__version__}, {os.cpu_count()} cores, "
              f"threads {torch.get_num_threads()}")
    print(header)
    rows = []
    for attn in args.attn:
        model = build_model(args, attn, dtype, device)
        for batch in args.batch_size:
            specs = row_specs(shape, layout, recipes, args.methods, batch, max(args.new_tokens))
            with torch.inference_mode():
                rows += run_group(model, attn, batch, specs, layout, args, shape, dtype)
        del model
    add_figures_of_merit(rows)
    table = markdown_table(rows)
    print(table)
    stem = os.path.join(args.out_dir, args.tag)
    write_csv(rows, stem + ".csv")
    atomic.write_text(stem + ".md", header + "\n\n" + table + "\n")
    plot_latency_vs_flops(rows, stem + ".png", title=header.split(";")[0])
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
