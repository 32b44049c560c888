"""`llava-fitprune fit`: fit FitPrune recipes for FLOPs budgets from a calibration set.

    llava-fitprune fit --model-path liuhaotian/llava-v1.5-7b \\
        --question-file calib.jsonl --image-folder images/ --reduction-ratio 0.4 0.5 0.6 --out recipes/
    llava-fitprune fit --dry-run --recipe recipes/llava-v1.5-7b-fitprune-r0.6-total.json

Writes into --out one recipe JSON per budget (every setting lives in the JSON), a plot of visual
tokens per layer (`visual_tokens_per_layer.png`) and `fit_report.json` (wall time and peak memory
per phase, search counts: everything that varies between runs, kept out of the recipes).
"""
from __future__ import annotations

import os
import sys

from ..core.fit_stages import check_max_pruning_layers
from ..utils import atomic
from .args import Parser, at_least, check_common, check_range, fail, loading, output_dir
from .backend import require_backend
from ..core.flops import LMShape, NAMED_SHAPES, prefill_report, resolve_shape
from ..core.recipe import Recipe, RecipeError, check_reduction_ratio, load_recipe


def parse_args(argv):
    p = Parser(prog="llava-fitprune fit", description=__doc__.splitlines()[0])
    p.add_argument("--model-path")
    p.add_argument("--model-base", default=None)
    p.add_argument("--model-name", default=None, help="name recorded in the recipes (default: from --model-path)")
    p.add_argument("--question-file", help="LLaVA question jsonl: question_id, image, text per line")
    p.add_argument("--image-folder")
    p.add_argument("--reduction-ratio", type=float, nargs="+", help="fractions of FLOPs to remove, in [0, 1)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--conv-mode", default=None,
                   help="LLaVA backend: conversation template (default vicuna_v1); transformers backend: the "
                        "processor's chat template is used")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration questions drawn from --question-file (default: all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch in each layer step")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--flops-convention", default="total", choices=["total", "visual_only"])
    p.add_argument("--tol", type=float, default=0.01, help="bisection tolerance on alpha")
    p.add_argument("--max-pruning-layers", type=int, default=None, metavar="K",
                   help="at most K layers drop tokens (few-stage schedule, docs/fit.md); default: no cap")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the FLOPs budget and schedule of --recipe")
    p.add_argument("--recipe", help="recipe JSON for --dry-run")
    p.add_argument("--num-text-tokens", type=int, default=None,
                   help="--dry-run: text tokens of the prompt (default: the recipe's fitted reference)")
    args = p.parse_args(argv)
    check_args(p, args, argv)
    return args


def check_args(p, args, argv=()) -> None:
    """Ranges, the shared options and the output folder: before any file is read or weights load."""
    at_least(p, args, 1, "num_samples", "batch_size", "max_pruning_layers")
    check_range(p, args, ["tol"], low=0, high=1, low_open=True, high_open=True, hint=" (a tolerance on alpha)")
    args.backend = None
    if args.dry_run:
        return
    if args.model_path:  # the checkpoint's backend (config.json only), refused here when this venv lacks it
        args.backend = require_backend(p.prog, args.model_path, argv)
    if args.backend == "hf" and args.conv_mode is not None:
        fail(p, "conv_mode", args.conv_mode, "LLaVA backend only: a transformers checkpoint is asked with its "
                                             "processor's chat template; leave --conv-mode out")
    if args.backend == "hf" and args.model_base is not None:
        fail(p, "model_base", args.model_base, "LLaVA backend only (LoRA / projector-only checkpoints): a transformers "
                                               "checkpoint is whole; leave --model-base out")
    if args.backend != "hf" and args.conv_mode is None:
        args.conv_mode = "vicuna_v1"
    check_common(p, args)
    if args.question_file and not os.path.isfile(args.question_file):
        fail(p, "question_file", args.question_file, "no such file: pass a LLaVA question jsonl")
    if args.image_folder and not os.path.isdir(args.image_folder):
        fail(p, "image_folder", args.image_folder, "no such folder: pass the folder the questions' images are in")
    if args.out:
        output_dir(p, args, "out")


def _shape_of(recipe: Recipe, model_path: str | None) -> LMShape:
    if model_path:
        return resolve_shape(model_path)
    m = dict(recipe.model)
    name = m.pop("name", None)
    try:
        return LMShape(**m)
    except TypeError:
        if name in NAMED_SHAPES:
            return NAMED_SHAPES[name]
    raise RecipeError(f"the recipe does not record the model's sizes: pass --model-path (a checkpoint or config.json)")


def dry_run(args) -> int:
    if not args.recipe:
        raise RecipeError("--dry-run needs --recipe RECIPE.json")
    recipe = load_recipe(args.recipe)
    shape = _shape_of(recipe, args.model_path)
    n_text = args.num_text_tokens if args.num_text_tokens is not None else \
        recipe.provenance.get("reference_text_tokens")
    if n_text is None:
        raise RecipeError("the recipe records no reference text length: pass --num-text-tokens N")
    if int(n_text) < 0:
        raise RecipeError(f"--num-text-tokens is a token count >= 0, got {n_text}")
    rep = prefill_report(shape, int(n_text), recipe.num_visual_tokens, recipe.drop_per_layer)
    alive = recipe.visual_tokens_entering()
    print(f"recipe {args.recipe}: method {recipe.method}, model {recipe.model.get('name')}, "
          f"{recipe.num_visual_tokens} visual + {n_text} text tokens")
    print(f"  total FLOPs (prefill, all tokens): dense {rep.dense_flops:.4e} -> pruned {rep.pruned_flops:.4e}, "
          f"reduction {rep.reduction:.4f}")
    print(f"  visual-only MACs (paper):          dense {rep.dense_visual_macs:.4e} -> pruned "
          f"{rep.pruned_visual_macs:.4e}, reduction {rep.visual_only_reduction:.4f}")
    if recipe.reduction_ratio is not None:
        dense, pruned, got = (rep.dense_flops, rep.pruned_flops, rep.reduction) if recipe.flops_convention == "total" \
            else (rep.dense_visual_macs, rep.pruned_visual_macs, rep.visual_only_reduction)
        verdict = "meets it" if got >= recipe.reduction_ratio else "MISSES it"
        print(f"  budget ({recipe.flops_convention}): reduction_ratio {recipe.reduction_ratio} -> at most "
              f"{(1 - recipe.reduction_ratio) * dense:.4e}; the schedule spends {pruned:.4e} and {verdict}")
    print(f"  mean visual tokens entering a layer: {sum(alive[:-1]) / len(alive[:-1]):.1f}")
    print("  layer  drop  visual_entering  tokens_entering")
    for l, d in enumerate(recipe.drop_per_layer):
        print(f"  {l:5d} {d:5d} {alive[l]:16d} {rep.schedule[l]:16d}")
    return 0


def plot(recipes: list[Recipe], path: str, title: str) -> None:
    from ..utils.plots import plot_schedules

    plot_schedules(recipes, path, title=title)


def recipe_filename(recipe: Recipe) -> str:
    k = recipe.provenance.get("max_pruning_layers")
    return f"{recipe.model.get('name', 'model')}-fitprune-r{recipe.reduction_ratio}-{recipe.flops_convention}" \
           f"{'' if k is None else f'-k{k}'}.json"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.dry_run:
            return dry_run(args)
        missing = [f"--{k.replace('_', '-')}" for k in ("model_path", "question_file", "image_folder",
                                                         "reduction_ratio", "out") if not getattr(args, k)]
        if missing:
            print(f"llava-fitprune fit: missing {' '.join(missing)}", file=sys.stderr)
            return 2
        ratios = [check_reduction_ratio(r) for r in args.reduction_ratio]  # before loading anything
        check_max_pruning_layers(args.max_pruning_layers)  # >= 1 here; <= the layer count once the model is loaded
        return run_fit(args, ratios)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"llava-fitprune fit: error: {e}", file=sys.stderr)
        return 2


def calibration_size(args, num_questions: int) -> int:
    """--num-samples, or every question of the file when it is not given."""
    if args.num_samples is None:
        print(f"note: calibrating on all {num_questions} questions of {args.question_file} (pass --num-samples N "
              f"for a random subset; the authors used about 66)")
        return num_questions
    if args.num_samples > num_questions:
        raise ValueError(f"--num-samples {args.num_samples}: the question file {args.question_file} has only "
                         f"{num_questions} questions: pass --num-samples {num_questions} or fewer, or leave it out")
    return args.num_samples


def run_fit(args, ratios) -> int:
    from ..core.calibration import read_questions

    num_samples = calibration_size(args, len(read_questions(args.question_file)))  # before loading the model
    report: dict = {"args": vars(args)}
    if args.backend == "hf":
        from .fit_hf import run_fit_hf

        with loading("llava-fitprune fit", "model_path", args.model_path):
            recipes, name = run_fit_hf(args, ratios, num_samples, report)
    else:
        recipes, name = run_fit_llava(args, ratios, num_samples, report)
    write_outputs(args, recipes, name, report)
    return 0


def run_fit_llava(args, ratios, num_samples: int, report: dict):
    """(recipes, model name): the LLaVA backend (.venv)."""
    import time

    from llava.mm_utils import get_model_name_from_path

    from ..adapters.llava.builder import load_pretrained_model
    from ..adapters.llava.calibration import build_calibration
    from ..core.fit import fit

    progress = not args.no_progress
    t0 = time.perf_counter()
    with loading("llava-fitprune fit", "model_path", args.model_path):
        tokenizer, model, processor, _ = load_pretrained_model(
            args.model_path, args.model_base, get_model_name_from_path(args.model_path), device=args.device,
            torch_dtype=args.dtype)
    report["load_model_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    calib = build_calibration(model, tokenizer, processor, args.question_file, args.image_folder,
                              conv_mode=args.conv_mode, num_samples=num_samples, seed=args.seed,
                              progress=progress)
    report["calibration_s"] = round(time.perf_counter() - t0, 3)
    name = args.model_name or get_model_name_from_path(args.model_path)
    recipes = fit(model, calib, ratios, convention=args.flops_convention, tol=args.tol, progress=progress,
                  batch_size=args.batch_size, model_name=name, report=report,
                  max_pruning_layers=args.max_pruning_layers)
    return recipes, name


def write_outputs(args, recipes, name: str, report: dict) -> None:
    for r in recipes:
        path = os.path.join(args.out, recipe_filename(r))
        r.save(path)
        print(f"wrote {path}: drops {r.drop_per_layer} (alpha {r.provenance['alpha']}, achieved "
              f"{r.achieved_reduction} for {r.reduction_ratio})")
    plot(recipes, os.path.join(args.out, "visual_tokens_per_layer.png"),
         f"FitPrune schedules, {name}, {args.flops_convention} FLOPs")
    atomic.write_json(os.path.join(args.out, "fit_report.json"), report, sort_keys=True, default=str, newline=False)
    print(f"wrote {os.path.join(args.out, 'visual_tokens_per_layer.png')} and fit_report.json")


if __name__ == "__main__":
    sys.exit(main())
