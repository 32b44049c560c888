"""`llava-fitprune lvprune-train`'s arguments and every check that can run before the model loads.

Each bad input ends in one line naming the argument and the fix, exit status 2 (cli.args).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

from ..cli.args import Parser, at_least, check_common, check_range, comma_list, fail, output_dir
from .checkpoints import CheckpointError, find_checkpoint
from .data import DEFAULT_TEMPLATE, check_data
from .modules import CONFIG_NAME, DEFAULT_HEADS, DEFAULT_TEMPERATURE, DEFAULT_WIDTH, LVPruneConfig

DESCRIPTION = "train LVPruning modules on a frozen LLaVA (docs/lvpruning.md)"
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def build_parser() -> Parser:
    p = Parser(prog="llava-fitprune lvprune-train", description=DESCRIPTION)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--data-path", required=True, help="LLaVA instruction json")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--conv-template", default=DEFAULT_TEMPLATE)
    p.add_argument("--layers", type=comma_list(int, "2,8,16"), default=None, help="module layers, e.g. 2,8,16 (default: scaled to depth)")
    p.add_argument("--keep", type=comma_list(float, "0.5,0.25,0.1"), default=None, help="keep fraction after each module, e.g. 0.5,0.25,0.1")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p.add_argument("--heads", type=int, default=DEFAULT_HEADS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="Gumbel-softmax temperature")
    p.add_argument("--ratio-weight", type=float, default=2.0, help="weight of the keep-ratio MSE loss")
    p.add_argument("--init-keep", type=float, default=None, help="initial keep probability (default: the targets)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--log-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="a checkpoint-STEP folder, or (alone) the newest complete one in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="model dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--model-max-length", type=int, default=None)
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config (ZeRO-2: scripts/zero2.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(p, args) -> None:
    """Everything checkable from the arguments and the files they name, before any weights load."""
    if args.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            fail(p, "deepspeed", args.deepspeed, "DeepSpeed is not installed: pip install deepspeed (or "
                                                 "llava-fitprune[train]), or leave --deepspeed out")
        if not os.path.isfile(args.deepspeed):
            fail(p, "deepspeed", args.deepspeed, "no such config file: pass a DeepSpeed JSON, e.g. scripts/zero2.json")
    at_least(p, args, 1, "epochs", "max_steps", "batch_size", "grad_accum", "log_steps", "save_steps", "width",
             "heads", "model_max_length")
    at_least(p, args, 0, "num_workers")
    check_range(p, args, ["lr", "temperature"], low=0, low_open=True)
    check_range(p, args, ["weight_decay", "ratio_weight", "max_grad_norm"], low=0)
    check_range(p, args, ["warmup_ratio"], low=0, high=1)
    check_range(p, args, ["init_keep"], low=0, high=1, low_open=True, high_open=True)
    check_range(p, args, ["keep"], low=0, high=1, low_open=True, hint=" (the fraction of visual tokens kept)")
    if args.width % args.heads:
        fail(p, "width", args.width, f"not divisible by --heads {args.heads}: pick a multiple")
    check_common(p, args)  # --model-path, --model-base, --device, --attn, --conv-template
    if args.resume not in (None, "latest"):
        try:
            find_checkpoint(args.output_dir, args.resume)
        except CheckpointError as e:
            p.error(str(e))
    _check_schedule(p, args)
    try:
        check_data(args.data_path, args.image_folder)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        fail(p, "data_path", args.data_path, f"{e}: pass LLaVA instruction data (a JSON list)")
    if args.image_folder and not os.path.isdir(args.image_folder):
        fail(p, "image_folder", args.image_folder, "no such folder: pass the folder the data's image paths are "
                                                   "relative to")
    output_dir(p, args, "output_dir")


def model_sizes(model_path: str) -> tuple[int, int] | None:
    """(hidden size, decoder layers) from a local checkpoint's config.json; None for a hub id."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    sizes = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    if not all(isinstance(x, int) and x > 0 for x in sizes):
        raise ValueError(f"{path} gives no hidden_size / num_hidden_layers")
    return sizes


def _check_schedule(p, args) -> None:
    """--layers / --keep against the model's depth (a local checkpoint), and a resumed checkpoint's modules."""
    if bool(args.layers) != bool(args.keep):
        fail(p, "layers" if args.layers else "keep", args.layers or args.keep,
             "give --layers and --keep together (one keep fraction per layer), or neither for the default")
    try:
        sizes = model_sizes(args.model_path)
    except ValueError as e:  # json.JSONDecodeError included
        fail(p, "model_path", args.model_path, f"unreadable config.json ({e}): pass a LLaVA checkpoint folder")
    if sizes is None:
        return
    try:
        config = modules_config(args, *sizes)
    except ValueError as e:
        fail(p, "layers", ",".join(map(str, args.layers or [])) or "(default)",
             f"{e} (this model has {sizes[1]} layers): fix --layers/--keep")
    ckpt = find_checkpoint(args.output_dir, args.resume, warn=lambda _: None) if args.resume else None
    if ckpt:
        with open(os.path.join(ckpt, CONFIG_NAME), encoding="utf-8") as f:
            saved = json.load(f)
        if saved != config.to_dict():
            fail(p, "resume", ckpt, "holds modules of another configuration: resume with its --layers/--keep/"
                                    "--width/--heads/--temperature/--model-path, or use another --output-dir")


def modules_config(args, hidden_size: int, num_layers: int) -> LVPruneConfig:
    """The modules' configuration these arguments ask for (ValueError if the schedule does not fit)."""
    return LVPruneConfig(hidden_size=hidden_size, num_layers=num_layers, layers=args.layers or [],
                         keep=args.keep or [], width=args.width, heads=args.heads, temperature=args.temperature,
                         model={"name": args.model_path})
