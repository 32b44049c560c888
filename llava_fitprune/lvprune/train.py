"""`llava-fitprune lvprune-train`: train LVPruning modules on a frozen LLaVA (docs/lvpruning.md).

    llava-fitprune lvprune-train --model-path liuhaotian/llava-v1.5-7b \\
        --data-path llava_v1_5_mix665k.json --image-folder playground/data --output-dir out/lvprune
    deepspeed --module llava_fitprune.cli lvprune-train ... --deepspeed scripts/zero2.json   # ZeRO-2

Only the modules train; the model's weights are frozen and never written. The output folder gets
the modules (`lvprune_modules.safetensors` + `lvprune_config.json`), their schedule as a recipe,
`train_log.jsonl`, and `checkpoint-STEP/` folders that `--resume` continues from.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from ..cli.args import loading
from .checkpoints import CheckpointError, find_checkpoint, remove_partials, trim_log, write_checkpoint
from .data import batches, epoch_order, make_dataset, micro_batches_per_epoch, to_device
from .engine import DeepSpeedEngine, LocalEngine, TrainStep, resolve_deepspeed_config
from .modules import LVPruneModules
from .selector import model_num_visual_tokens
from .train_args import DTYPE_NAMES, build_parser, check_args, modules_config

LOG_NAME = "train_log.jsonl"
RECIPE_NAME = "lvprune_recipe.json"
DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32)))


class TrainInputError(ValueError):
    """Input found wrong only once the model is loaded; the message names the argument."""


def parse_args(argv):
    return build_parser().parse_args(argv)


def _setup(args):
    """(device, dtype, rank, world)."""
    if args.deepspeed:
        try:
            import deepspeed
        except ImportError:
            raise SystemExit("--deepspeed needs DeepSpeed: pip install deepspeed (or llava-fitprune[train])") from None
        deepspeed.init_distributed()
        local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
        torch.cuda.set_device(local_rank)
        device, rank, world = f"cuda:{local_rank}", torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        rank, world = 0, 1
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype, rank, world


def _load_model(args, device, dtype):
    from llava.mm_utils import get_model_name_from_path

    from ..adapters.llava.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, get_model_name_from_path(args.model_path), device=device,
        device_map={"": device}, torch_dtype=dtype, attn_implementation=args.attn)  # one whole copy per process
    if args.model_max_length:
        tokenizer.model_max_length = args.model_max_length
    return tokenizer, model, image_processor


def _schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, math.ceil(total_steps * warmup_ratio))

    def factor(step):  # linear warmup, cosine decay (LLaVA's schedule)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _make_engine(args, step_module: TrainStep, total_steps: int, world: int, dtype):
    optimizer = torch.optim.AdamW(step_module.lvprune.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = _schedule(optimizer, total_steps, args.warmup_ratio)
    if not args.deepspeed:
        return LocalEngine(step_module, optimizer, scheduler, args.grad_accum, args.max_grad_norm)
    hidden = step_module.lvprune.config.hidden_size
    config = resolve_deepspeed_config(args.deepspeed, args.batch_size, args.grad_accum, world, hidden, dtype,
                                      args.max_grad_norm)
    return DeepSpeedEngine(step_module, optimizer, scheduler, config)


def _resume(args, engine, modules: LVPruneModules, rank: int) -> dict:
    """The training position: fresh, or restored (modules, optimiser, schedule, RNG) from a checkpoint."""
    fresh = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    warn = {} if rank == 0 else {"warn": lambda _: None}  # torn checkpoints: one warning, from rank 0
    ckpt = find_checkpoint(args.output_dir, args.resume, **warn) if args.resume else None
    if ckpt is None:
        if args.resume and rank == 0:
            print(f"--resume: no checkpoint in {args.output_dir}, starting fresh")
        return fresh
    saved = LVPruneModules.load(ckpt)
    if saved.config.to_dict() != modules.config.to_dict():
        raise CheckpointError(f"--resume {ckpt}: holds modules of another configuration ({saved.config}): resume "
                              f"with its --layers/--keep/--width/--heads/--temperature, or use another --output-dir")
    modules.load_state_dict(saved.state_dict())
    state = engine.load_checkpoint(ckpt)["state"]
    if rank == 0:
        print(f"resumed from {ckpt} at step {state['step']}")
    return state


def _log(log, bar, sums: dict, count: int, state: dict, lr: float, elapsed: float) -> None:
    row = {k: ([x / count for x in v] if isinstance(v, list) else v / count) for k, v in sums.items()}
    row.update(step=state["step"], epoch=state["epoch"], lr=lr, elapsed_s=round(elapsed, 1))
    bar.set_postfix(loss=f"{row['loss']:.4f}", keep=",".join(f"{k:.3f}" for k in row["keep"]))
    if log:
        log.write(json.dumps(row) + "\n")
        log.flush()


def _accumulate(sums: dict, last: dict) -> None:
    """Running sums of the logged numbers (lists, e.g. the keep per module, element-wise)."""
    for k, v in last.items():
        if isinstance(v, list):
            sums[k] = [a + b for a, b in zip(sums[k], v)] if k in sums else list(v)
        else:
            sums[k] = sums.get(k, 0.0) + v


def _save(engine, modules, out_dir: str, state: dict, rank: int, world: int) -> None:
    """checkpoint-STEP/, appearing only once complete (checkpoints.py)."""
    def write(folder):
        if rank == 0:
            modules.save(folder)
        engine.save_checkpoint(folder, {"state": dict(state)})

    write_checkpoint(out_dir, state["step"], write, rank, world)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)  # every input, before the model loads
    device, dtype, rank, world = _setup(args)
    with loading(parser.prog, "model_path", args.model_path):
        tokenizer, model, image_processor = _load_model(args, device, dtype)
    try:
        train(args, tokenizer, model, image_processor, device, dtype, rank, world)
    except (CheckpointError, TrainInputError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def train(args, tokenizer, model, image_processor, device="cpu", dtype=torch.float32, rank: int = 0,
          world: int = 1) -> LVPruneModules:
    """Train modules for the frozen `model` (its weights are only read); returns the modules."""
    torch.manual_seed(args.seed + rank)
    model.requires_grad_(False)
    if model.recipe is not None:
        model.set_pruning(None)  # the dense model: decisions act as masks
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing runs in training mode only; LLaVA-1.5 has no dropout
    config = modules_config(args, model.config.hidden_size, len(model.get_model().layers))
    modules = LVPruneModules(config, init_keep=args.init_keep).to(device)
    dataset, collator = make_dataset(args.data_path, args.image_folder, tokenizer, image_processor, model.config,
                                     args.conv_template)
    per_epoch = micro_batches_per_epoch(len(epoch_order(len(dataset), args.seed, 0, rank, world)), args.batch_size)
    if per_epoch == 0:
        raise TrainInputError(f"--data-path {args.data_path}: {len(dataset)} samples are too few for {world} "
                              f"processes: use more data or fewer processes")
    total_steps = args.max_steps or args.epochs * math.ceil(per_epoch / args.grad_accum)
    step_module = TrainStep(modules, model, args.ratio_weight)
    engine = _make_engine(args, step_module, total_steps, world, dtype)
    os.makedirs(args.output_dir, exist_ok=True)
    if rank == 0:
        remove_partials(args.output_dir)  # half-written checkpoints of a killed run
    state = _resume(args, engine, modules, rank)
    log = None
    if rank == 0:
        trim_log(os.path.join(args.output_dir, LOG_NAME), state["step"])  # rows past the resumed step go
        log = open(os.path.join(args.output_dir, LOG_NAME), "a")
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0 or args.quiet, desc="lvprune-train")
    sums, count, start = {}, 0, time.time()
    while state["step"] < total_steps and (args.max_steps or state["epoch"] < args.epochs):
        order = epoch_order(len(dataset), args.seed, state["epoch"], rank, world)
        for batch in batches(dataset, collator, order, args.batch_size, state["micro_in_epoch"], args.num_workers):
            engine.backward(engine(to_device(batch, device, dtype)))
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state["micro_in_epoch"] += 1
            _accumulate(sums, step_module.last)
            count += 1
            if not boundary:
                continue
            state["step"] += 1
            bar.update(1)
            if state["step"] % args.log_steps == 0 or state["step"] == total_steps:
                _log(log, bar, sums, count, state, engine.get_lr()[0], time.time() - start)
                sums, count = {}, 0
            if state["step"] % args.save_steps == 0 or state["step"] == total_steps:
                _save(engine, modules, args.output_dir, state, rank, world)
            if state["step"] >= total_steps:
                break
        else:
            state["epoch"], state["micro_in_epoch"] = state["epoch"] + 1, 0
    bar.close()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.eval()
    if rank == 0:
        modules.save(args.output_dir)
        config.recipe(model_num_visual_tokens(model)).save(os.path.join(args.output_dir, RECIPE_NAME))
        print(f"LVPruning modules saved to {args.output_dir} after {state['step']} steps")
    if log:
        log.close()
    return modules
