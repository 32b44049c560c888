"""Stage 0: pretrain the CLIP vision tower on dense per-patch labels of the scenes (what covers each patch).

LLaVA starts from a pretrained CLIP; we have none, so the tower first learns, for every patch of the
features LLaVA uses (hidden_states[select_layer][:, 1:]), the kind of object over it (background, one
of the shapes, text), its colour and the written digit, with a linear head that is thrown away;
optionally also the patch's own row and column, so that where a patch is stays a strong, linearly
readable part of its feature (left/right questions compare two objects' positions).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .draw import COLOURS, SHAPES, object_map

IGNORE = -100
KINDS = ("background",) + SHAPES + ("text",)
DIGITS = 10
SINCOS_BASE = 10000.0


@dataclass
class PretrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    min_pixels: int = 8  # pixels an object needs inside a patch to label it
    position_targets: bool = False  # also classify each patch's own row and column (so position is a strong, linear feature)
    seed: int = 0
    log_every: int = 10


def init_sincos_positions(clip) -> None:
    """Initialise CLIP's learned position embeddings with fixed 2-D sin-cos values (as MAE does).

    A from-scratch ViT otherwise has no notion of which patches are neighbours, and learns it slowly.
    The class position gets zeros. Shape of the table: (1 + side * side, hidden).
    """
    emb = clip.vision_model.embeddings
    side = clip.config.image_size // clip.config.patch_size
    dim = emb.position_embedding.weight.shape[1]
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / SINCOS_BASE ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def _enc(pos):  # (side*side,) -> (side*side, dim/2)
        ang = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    table = torch.cat([_enc(rows), _enc(cols)], dim=1)  # (side*side, dim): row half, column half
    with torch.no_grad():
        emb.position_embedding.weight[0].zero_()
        emb.position_embedding.weight[1:] = table.to(emb.position_embedding.weight.dtype)


def patch_positions(side: int) -> torch.Tensor:
    """[side * side, 2] long: each patch's own (row, column), row-major as CLIP orders its patches."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def patch_targets(scene: dict, image_size: int, patch: int, min_pixels: int) -> torch.Tensor:
    """(num_patches, 3) long: kind index, colour index (or IGNORE), digit (or IGNORE), row-major patches."""
    ids = np.asarray(object_map(scene, image_size))  # (H, W): 0 background, k+1 shape k, last id the text
    side = image_size // patch
    blocks = ids[: side * patch, : side * patch].reshape(side, patch, side, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(side * side, patch * patch)
    text_id = len(scene["shapes"]) + 1
    out = torch.full((side * side, 3), IGNORE, dtype=torch.long)
    out[:, 0] = 0
    for p, block in enumerate(blocks):
        counts = np.bincount(block, minlength=text_id + 1)
        counts[0] = 0
        obj = int(counts.argmax())
        if counts[obj] < min_pixels:
            continue
        if obj == text_id:
            out[p, 0], out[p, 2] = KINDS.index("text"), int(scene["text"]["value"])
        else:
            s = scene["shapes"][obj - 1]
            out[p, 0], out[p, 1] = KINDS.index(s["shape"]), tuple(COLOURS).index(s["colour"])
    return out


def _load_split(split_dir: str, image_processor, image_size: int, patch: int, min_pixels: int):
    path = os.path.join(split_dir, "scenes.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: make the split with python -m llava_fitprune.synth.scenes")
    with open(path) as f:
        scenes = [json.loads(line) for line in f]
    return [(os.path.join(split_dir, "images", s["image"]), patch_targets(s, image_size, patch, min_pixels))
            for s in scenes]


def _accuracies(logits, targets) -> dict:
    """Per-target accuracy on object patches only (background patches would swamp it)."""
    on_object = targets[..., 0] > 0
    out = {}
    for k, (name, lg) in enumerate(zip(("kind", "colour", "digit", "row", "column"), logits)):
        t = targets[..., k]
        mask = on_object & (t != IGNORE)
        if mask.any():
            out[name + "_acc"] = round((lg.argmax(-1)[mask] == t[mask]).float().mean().item(), 3)
    return out


def pretrain_vision(tower, split_dir: str, cfg: PretrainConfig, log_path: str | None = None) -> list[dict]:
    """Train `tower` (LLaVA's loaded CLIPVisionTower) in place on split_dir's scenes; returns the loss log."""
    clip = tower.vision_tower
    vcfg = clip.config
    data = _load_split(split_dir, tower.image_processor, vcfg.image_size, vcfg.patch_size, cfg.min_pixels)
    if len(data) < cfg.batch_size:
        raise ValueError(f"{len(data)} scenes is fewer than one batch of {cfg.batch_size}")
    g = torch.Generator().manual_seed(cfg.seed)
    side = vcfg.image_size // vcfg.patch_size
    splits = (len(KINDS), len(COLOURS), DIGITS) + ((side, side) if cfg.position_targets else ())
    head = nn.Linear(vcfg.hidden_size, sum(splits))
    position = patch_positions(side)  # [N, 2]
    clip.requires_grad_(True)
    clip.train()
    params = list(clip.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    log = []
    bar = tqdm(range(cfg.steps), desc="pretrain vision")
    for step in bar:
        for group in opt.param_groups:  # linear decay to zero
            group["lr"] = cfg.lr * (1 - step / cfg.steps)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g).tolist()
        images = torch.stack([tower.image_processor.preprocess(Image.open(data[i][0]).convert("RGB"),
                                                               return_tensors="pt")["pixel_values"][0] for i in idx])
        targets = torch.stack([data[i][1] for i in idx])  # (B, N, 3)
        out = clip(images, output_hidden_states=True)
        feats = tower.feature_select(out)  # (B, N, vision_hidden), what LLaVA feeds the projector
        if cfg.position_targets:
            targets = torch.cat([targets, position.expand(len(idx), -1, -1)], dim=-1)  # (B, N, 5)
        logits = head(feats).split(splits, dim=-1)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), targets[..., k].flatten(), ignore_index=IGNORE)
                   for k, lg in enumerate(logits))
        on_object = targets[..., 0] > 0  # background swamps the kind loss: count object patches again
        if on_object.any():
            loss = loss + F.cross_entropy(logits[0][on_object], targets[..., 0][on_object])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"stage": "vision", "step": step, "loss": round(loss.item(), 5), **_accuracies(logits, targets)}
            log.append(rec)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    clip.requires_grad_(False)  # frozen again, as LLaVA's CLIPVisionTower.load_model leaves it
    clip.eval()
    return log
