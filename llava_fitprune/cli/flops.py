"""`llava-fitprune flops`: prefill TFLOPs and reductions of recipes, from a config alone (no weights)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .args import Parser, at_least, fail
from .backend import BackendError, backend_of_config, current_backend, read_config, wrong_venv
from ..core.flops import NAMED_SHAPES, decode_token_flops, prefill_report, resolve_shape
from ..core.recipe import RecipeError, builtin_recipes, check_reduction_ratio, load_recipe, builtin_recipe


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llava-fitprune flops", description=__doc__)
    p.add_argument("--config", default="llava-v1.5-7b",
                   help=f"a named shape {sorted(NAMED_SHAPES)} or a config.json / checkpoint folder "
                        f"(transformers-native ones: llava-hf, LLaVA-NeXT, Qwen2.5-VL, ...; a config that names only its differences from transformers' defaults needs .venv-hf)")
    p.add_argument("--recipe", nargs="*", default=[], help="recipe JSON files")
    p.add_argument("--reduction-ratio", nargs="*", type=float, default=None,
                   help="built-in LLaVA-1.5-7B recipes by ratio (default: all of them when no --recipe)")
    p.add_argument("--prompt-tokens", type=int, default=35, help="text tokens before the image")
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=30, help="text tokens after the image")
    return p


def config_shape(parser, config: str, argv=()):
    """The language model's sizes from --config; a one-line error for anything that is not a config.
    Either venv reads a full config; a transformers config that names only its differences from the
    defaults (llava-hf's) needs transformers 5: from .venv it is refused with the .venv-hf command."""
    fix = "pass a named shape or a checkpoint folder / config.json (LLaVA or transformers-native)"
    try:
        shape = resolve_shape(config)
    except json.JSONDecodeError as e:
        fail(parser, "config", config, f"not valid JSON ({e}): {fix}")
    except (ValueError, OSError) as e:
        if os.path.exists(config) and current_backend() != "hf":
            try:
                hf = backend_of_config(read_config(config)) == "hf"
            except BackendError:
                hf = False
            if hf:
                wrong_venv(parser.prog, "hf", f"--config {config}", argv)
        fail(parser, "config", config, f"{str(e).replace(f'config {config!r} ', '')}: {fix}")
    missing = [k for k, v in shape.to_dict().items() if not isinstance(v, int) or v < 1]
    if missing:
        fail(parser, "config", config, f"lacks the language model's sizes {missing}: {fix}")
    return shape


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    at_least(parser, args, 1, "visual_tokens")
    at_least(parser, args, 0, "prompt_tokens", "text_tokens")
    shape = config_shape(parser, args.config, argv)
    recipes = []
    try:
        recipes += [load_recipe(p) for p in args.recipe]
        if args.reduction_ratio is not None:
            recipes += [builtin_recipe(check_reduction_ratio(r)) for r in args.reduction_ratio]
        elif not args.recipe:  # the built-in recipes that fit this model (none fits another layer count)
            recipes += [r for r in builtin_recipes() if len(r.drop_per_layer) == shape.num_layers]
        for r in recipes:
            r.check_model(shape.num_layers)
    except RecipeError as e:
        parser.error(str(e))

    n_text = args.prompt_tokens + args.text_tokens
    dense = prefill_report(shape, n_text, args.visual_tokens, None)
    n_all = n_text + args.visual_tokens
    print(f"config {args.config}: {shape.num_layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, "
          f"heads {shape.num_heads}/{shape.num_kv_heads} (q/kv)")
    print(f"prompt: {args.prompt_tokens} text + {args.visual_tokens} visual + {args.text_tokens} text = {n_all} tokens")
    print(f"dense prefill: {dense.dense_flops / 1e12:.3f} TFLOPs (language model incl. LM head); "
          f"decode {decode_token_flops(shape, [n_all] * shape.num_layers) / 1e9:.2f} GFLOPs/token\n")
    if not recipes:
        print(f"no recipe given, and no built-in recipe has {shape.num_layers} layers: fit one for this model "
              f"(`llava-fitprune fit`) and pass it with --recipe")
        return 0
    header = ("ratio", "dropped", "avg visual/layer", "prefill TFLOPs", "reduction (total)",
              "reduction (paper, visual-only)", "decode GFLOPs/token")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in recipes:
        drops = r.drops_for(args.visual_tokens)
        rep = prefill_report(shape, n_text, args.visual_tokens, drops, text_before_image=args.prompt_tokens)
        alive = r.visual_tokens_entering(args.visual_tokens)[:-1]
        kv = [n_text + a for a in alive]
        ratio = "-" if r.reduction_ratio is None else f"{r.reduction_ratio:g}"
        print(f"| {ratio} | {sum(drops)} | {sum(alive) / len(alive):.1f} | {rep.pruned_flops / 1e12:.3f} | "
              f"{rep.reduction:.3f} | {rep.visual_only_reduction:.3f} | {decode_token_flops(shape, kv) / 1e9:.2f} |")
    return 0
