"""The optimiser side of LVPruning training: one process (`LocalEngine`) or DeepSpeed ZeRO-2.

Both expose the few calls of a DeepSpeed engine the training loop uses: `engine(batch)`,
`backward(loss)`, `is_gradient_accumulation_boundary()`, `step()`, `save_checkpoint`,
`load_checkpoint`. The engine's module is a `TrainStep`: the LVPruning modules (its only
parameters) plus the frozen LLaVA model held outside the module tree, so DeepSpeed never casts,
broadcasts, shards or saves the base weights.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn
from llava.constants import IGNORE_INDEX

from ..utils import atomic
from .masking import masked_forward
from .modules import LVPruneModules

LOCAL_STATE = "trainer_state.pt"
DEEPSPEED_TAG = "deepspeed"


class TrainStep(nn.Module):
    """loss = LM loss on the answers + ratio_weight * keep-ratio loss, with Gumbel decisions as masks."""

    def __init__(self, modules: LVPruneModules, model, ratio_weight: float):
        super().__init__()
        self.lvprune = modules
        object.__setattr__(self, "llava", model)  # not a submodule: frozen and never saved
        self.ratio_weight = ratio_weight
        self.last: dict = {}

    def forward(self, batch: dict) -> torch.Tensor:
        out, hook = masked_forward(self.llava, self.lvprune, batch["input_ids"], batch["images"],
                                   batch.get("attention_mask"), batch["labels"], mode="gumbel")
        labels = batch["labels"]
        supervised = bool((labels[:, 1:] != IGNORE_INDEX).any())  # else CrossEntropy of nothing is NaN
        lm = out.loss if supervised else out.logits.sum() * 0.0
        ratio = hook.ratio_loss()
        loss = lm + self.ratio_weight * ratio
        self.last = {"loss": float(loss.detach()), "lm_loss": float(lm.detach()), "ratio_loss": float(ratio.detach()),
                     "keep": hook.kept_means()}
        return loss


class LocalEngine:
    """Single process: AdamW, gradient accumulation, clipping, a LambdaLR schedule."""

    def __init__(self, module: TrainStep, optimizer, scheduler, grad_accum: int, max_grad_norm: Optional[float]):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self.micro_steps = 0

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.max_grad_norm:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def save_checkpoint(self, ckpt_dir: str, client_state: dict) -> None:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        with atomic.atomic_path(os.path.join(ckpt_dir, LOCAL_STATE)) as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "micro_steps": self.micro_steps, "client_state": client_state, "rng": rng}, tmp)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        state = torch.load(os.path.join(ckpt_dir, LOCAL_STATE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["client_state"]


def resolve_deepspeed_config(path: str, micro_batch: int, grad_accum: int, world: int, hidden_size: int,
                             dtype: torch.dtype, max_grad_norm: Optional[float]) -> dict:
    """Fill the "auto" entries of a LLaVA-style config the way HF's Trainer does (we use no Trainer)."""
    with open(path) as f:
        cfg = json.load(f)
    fills = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
             "train_batch_size": micro_batch * grad_accum * world}
    for key, value in fills.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    if cfg.get("gradient_clipping", "auto") == "auto" and max_grad_norm:
        cfg["gradient_clipping"] = max_grad_norm
    for key, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        if key in cfg and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = enabled
    zero = cfg.get("zero_optimization", {})
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    cfg["zero_allow_untested_optimizer"] = True  # a client torch AdamW, as LLaVA's Trainer passes
    left = [k for k, v in _flatten(cfg) if v == "auto"]
    if left:
        raise ValueError(f"{path}: cannot resolve 'auto' for {left}: set them in the config")
    return cfg


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


class DeepSpeedEngine:
    """A DeepSpeed engine with the LocalEngine checkpoint calls (ZeRO partitions saved per rank)."""

    def __init__(self, module: TrainStep, optimizer, scheduler, config: dict):
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=list(module.lvprune.parameters()),
                                                    optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = module

    def __call__(self, batch):
        return self.engine(batch)

    def backward(self, loss):
        self.engine.backward(loss)

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def step(self):
        self.engine.step()

    def get_lr(self) -> list[float]:
        return self.engine.get_lr()

    def save_checkpoint(self, ckpt_dir: str, client_state: dict) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=DEEPSPEED_TAG, client_state=client_state)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        _, client_state = self.engine.load_checkpoint(ckpt_dir, tag=DEEPSPEED_TAG)
        return client_state or {}
