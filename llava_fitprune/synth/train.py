"""Train a tiny LLaVA-1.5 (CLIP 336/14 tower, mlp2x_gelu projector, Llama decoder) on synthetic scenes, on CPU.

python -m llava_fitprune.synth.train --data DATA/train --out CKPT [--test TEST] [--steps N] [--seed S]

Builds the random initial checkpoint with `llava_fitprune.tiny.build_tiny_llava`, trains every
weight (vision tower included) with LLaVA's dataset, vicuna_v1 label masking and
`LlavaLlamaForCausalLM.forward`, and saves the checkpoint layout of `build_tiny_llava` in fp16.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from ..tiny import TinyLlavaSpec, build_tiny_llava
from .data import epoch_order, llava_collator, llava_dataset
from .model_io import load_llava, save_llava, trainable_vision_tower
from .pretrain_vision import PretrainConfig, pretrain_vision
from .questions import phrasebook

TOKENIZER_PHRASE_REPEAT = 100  # weight of the task's phrasing in the tokenizer corpus


def synth_spec(seed: int = 0) -> TinyLlavaSpec:
    """The shipped model: LLaVA-1.5's shapes (336 px, patch 14 -> 576 visual tokens), tiny widths."""
    return TinyLlavaSpec(
        num_layers=6, hidden_size=128, num_heads=4, intermediate_size=512,
        vision_hidden_size=128, vision_layers=4, vision_heads=4, vision_intermediate_size=512,
        vocab_size=768, tokenizer_extra_text=phrasebook(), tokenizer_extra_repeat=TOKENIZER_PHRASE_REPEAT,
        init_std=None, seed=seed,
    )


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    vision_steps: int = 0  # stage 0: steps of dense per-patch pretraining of the vision tower (0: none)
    vision_lr: float = 2e-3
    tune_vision: bool = True  # train the vision tower in the LLaVA stage too (LLaVA itself keeps it frozen)
    eval_every: int = 0  # 0: no evaluation while training
    eval_limit: int = 40  # questions of the test split scored at each evaluation
    save_dtype: str = "float16"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def seed_everything(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def batches(num: int, cfg: TrainConfig):
    """Yield cfg.steps lists of indices, epoch after epoch, each epoch in a seeded order."""
    if num < cfg.batch_size:
        raise ValueError(f"{num} training scenes is fewer than one batch of {cfg.batch_size}")
    per_epoch = num // cfg.batch_size
    for step in range(cfg.steps):
        epoch, k = divmod(step, per_epoch)
        order = epoch_order(num, cfg.seed, epoch)
        yield order[k * cfg.batch_size:(k + 1) * cfg.batch_size]


def quick_eval(model, tokenizer, image_processor, test_dir: str, limit: int, predictions_file: str | None = None) -> dict:
    from .evaluate import evaluate

    model.eval()
    res = evaluate(model, tokenizer, image_processor, os.path.join(test_dir, "questions.jsonl"),
                   os.path.join(test_dir, "answers.jsonl"), os.path.join(test_dir, "images"), limit=limit,
                   progress=False, predictions_file=predictions_file)
    model.train()
    return {k: round(v["accuracy"], 3) for k, v in res.items()}


def train_steps(model, dataset, collate, cfg: TrainConfig, log_path: str | None = None,
                eval_fn=None) -> list[dict]:
    """Run cfg.steps AdamW steps over `dataset` with the vision tower trainable; returns the loss log.

    `eval_fn()` (-> dict), if given, runs every cfg.eval_every steps and is logged.
    """
    model.train()
    log, t0, c0 = [], time.time(), time.process_time()
    with trainable_vision_tower(model) if cfg.tune_vision else contextlib.nullcontext():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        bar = tqdm(batches(len(dataset), cfg), total=cfg.steps, desc="train")
        for step, idx in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = collate([dataset[i] for i in idx])  # input_ids/labels (B, T), images (B, 3, H, W)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr_at(step, cfg),
                       "elapsed_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
                if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step:
                    rec["eval"] = eval_fn()
                log.append(rec)
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    model.eval()
    return log


def train(data_dir: str, out_dir: str, cfg: TrainConfig, spec: TinyLlavaSpec | None = None,
          init_dir: str | None = None, test_dir: str | None = None) -> dict:
    """Build the initial checkpoint, train it on data_dir (a split dir), save to out_dir. Returns a record."""
    seed_everything(cfg.seed, cfg.threads)
    spec = spec or synth_spec(cfg.seed)
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = init_dir or os.path.join(tmp, "llava-synth-init")
        build_tiny_llava(init_dir, spec)
        tokenizer, model, image_processor = load_llava(init_dir)
        dataset = llava_dataset(data_dir, tokenizer, image_processor, spec.image_aspect_ratio)
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, "train_log.jsonl")
        if os.path.exists(log_path):
            os.remove(log_path)
        if cfg.vision_steps:
            pretrain_vision(model.get_vision_tower(), data_dir,
                            PretrainConfig(steps=cfg.vision_steps, lr=cfg.vision_lr, seed=cfg.seed), log_path)
        eval_fn = None
        if test_dir is not None:
            preds = os.path.join(out_dir, "quick_eval_predictions.jsonl")
            eval_fn = lambda: quick_eval(model, tokenizer, image_processor, test_dir, cfg.eval_limit, preds)  # noqa: E731
        log = train_steps(model, dataset, llava_collator(tokenizer), cfg, log_path, eval_fn)
        save_llava(model, tokenizer, out_dir, getattr(torch, cfg.save_dtype), spec_from=init_dir)
    spec_record = {k: v for k, v in asdict(spec).items() if k != "tokenizer_extra_text"}
    record = {"data": os.path.abspath(data_dir), "num_scenes": len(dataset), "train": asdict(cfg),
              "spec": spec_record, "wall_s": round(time.time() - t0, 1),
              "cpu_s": round(time.process_time() - c0, 1), "final_loss": log[-1]["loss"],
              "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    with open(os.path.join(out_dir, "train_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


CLI_FIELDS = ("steps", "batch_size", "lr", "warmup_steps", "seed", "threads", "vision_steps", "vision_lr",
              "tune_vision", "eval_every", "eval_limit")


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("0", "1", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")
    return text.lower() in ("1", "true")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a training split dir (conversations.json + images/)")
    p.add_argument("--out", required=True, help="where the trained checkpoint goes")
    p.add_argument("--test", default=None, help="a test split dir to score the saved checkpoint on")
    d = TrainConfig()
    for name in CLI_FIELDS:
        kind = type(getattr(d, name))
        p.add_argument("--" + name.replace("_", "-"), type=_parse_bool if kind is bool else kind, default=getattr(d, name))
    a = p.parse_args(argv)
    cfg = replace(d, **{k: getattr(a, k) for k in CLI_FIELDS})
    record = train(a.data, a.out, cfg, test_dir=a.test)
    print(json.dumps({k: record[k] for k in ("wall_s", "cpu_s", "final_loss", "params")}))
    if a.test:
        from .evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(a.out, a.test)
        with open(os.path.join(a.out, "eval_dense.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
