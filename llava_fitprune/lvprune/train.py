"""`llava-fitprune lvprune-train`: train LVPruning modules on a frozen LLaVA (docs/lvpruning.md).

    llava-fitprune lvprune-train --model-path liuhaotian/llava-v1.5-7b \\
        --data-path llava_v1_5_mix665k.json --image-folder playground/data --output-dir out/lvprune
    deepspeed --module llava_fitprune.cli lvprune-train ... --deepspeed scripts/zero2.json   # ZeRO-2

Only the modules train; the model's weights are frozen and never written. The output folder gets
the modules (`lvprune_modules.safetensors` + `lvprune_config.json`), their schedule as a recipe,
`train_log.jsonl`, and `checkpoint-STEP/` folders that `--resume` continues from.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import time

import torch
from tqdm import tqdm

from .data import DEFAULT_TEMPLATE, batches, epoch_order, make_dataset, micro_batches_per_epoch, to_device
from .engine import DeepSpeedEngine, LocalEngine, TrainStep, resolve_deepspeed_config
from .modules import DEFAULT_HEADS, DEFAULT_TEMPERATURE, DEFAULT_WIDTH, LVPruneConfig, LVPruneModules
from .selector import model_num_visual_tokens

LOG_NAME = "train_log.jsonl"
RECIPE_NAME = "lvprune_recipe.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="llava-fitprune lvprune-train", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--data-path", required=True, help="LLaVA instruction json")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--conv-template", default=DEFAULT_TEMPLATE)
    p.add_argument("--layers", type=_ints, default=None, help="module layers, e.g. 2,8,16 (default: scaled to depth)")
    p.add_argument("--keep", type=_floats, default=None, help="keep fraction after each module, e.g. 0.5,0.25,0.1")
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
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="a checkpoint folder, or the latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--model-max-length", type=int, default=None)
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config (ZeRO-2: scripts/zero2.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


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


def find_checkpoint(output_dir: str, resume: str) -> str | None:
    if resume != "latest":
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        return resume
    found = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    steps = [(int(m.group(1)), d) for d in found if (m := re.search(r"checkpoint-(\d+)$", d))]
    return max(steps)[1] if steps else None


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
    ckpt = find_checkpoint(args.output_dir, args.resume) if args.resume else None
    if ckpt is None:
        if args.resume and rank == 0:
            print(f"--resume: no checkpoint in {args.output_dir}, starting fresh")
        return fresh
    saved = LVPruneModules.load(ckpt)
    if saved.config.to_dict() != modules.config.to_dict():
        raise SystemExit(f"{ckpt} holds modules of another configuration ({saved.config}); "
                         f"resume with the same --layers/--keep/--width/--heads/--temperature")
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


def _save(engine, modules, out_dir: str, state: dict, rank: int) -> None:
    ckpt = os.path.join(out_dir, f"checkpoint-{state['step']}")
    if rank == 0:
        modules.save(ckpt)
    engine.save_checkpoint(ckpt, {"state": dict(state)})


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, rank, world = _setup(args)
    tokenizer, model, image_processor = _load_model(args, device, dtype)
    train(args, tokenizer, model, image_processor, device, dtype, rank, world)
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
    config = LVPruneConfig(hidden_size=model.config.hidden_size, num_layers=len(model.get_model().layers),
                           layers=args.layers or [], keep=args.keep or [], width=args.width, heads=args.heads,
                           temperature=args.temperature, model={"name": args.model_path})
    modules = LVPruneModules(config, init_keep=args.init_keep).to(device)
    dataset, collator = make_dataset(args.data_path, args.image_folder, tokenizer, image_processor, model.config,
                                     args.conv_template)
    per_epoch = micro_batches_per_epoch(len(epoch_order(len(dataset), args.seed, 0, rank, world)), args.batch_size)
    if per_epoch == 0:
        raise SystemExit(f"{args.data_path}: {len(dataset)} samples are too few for {world} processes")
    total_steps = args.max_steps or args.epochs * math.ceil(per_epoch / args.grad_accum)
    step_module = TrainStep(modules, model, args.ratio_weight)
    engine = _make_engine(args, step_module, total_steps, world, dtype)
    os.makedirs(args.output_dir, exist_ok=True)
    state = _resume(args, engine, modules, rank)
    log = open(os.path.join(args.output_dir, LOG_NAME), "a") if rank == 0 else None
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
                _save(engine, modules, args.output_dir, state, rank)
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
