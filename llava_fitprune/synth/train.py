"""Train a tiny LLaVA-1.5 (CLIP 336/14 tower, mlp2x_gelu projector, Llama decoder) on synthetic scenes, on CPU.

python -m llava_fitprune.synth.train --data DATA/train --out CKPT [--test TEST] [--steps N] [--seed S]

Builds the random initial checkpoint with `llava_fitprune.adapters.llava.tiny.build_tiny_llava`; stage 0 pretrains
the CLIP tower on dense per-patch labels (`pretrain_vision.py`); the LLaVA stage trains projector
and decoder (tower frozen, as LLaVA's fine-tuning; `tune_vision` trains it too) with LLaVA's
dataset, vicuna_v1 label masking and `LlavaLlamaForCausalLM.forward`; saves the checkpoint layout
of `build_tiny_llava` in fp16. The defaults are the best recipe so far: docs/synth.md.
"""
from __future__ import annotations

import argparse
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

from ..adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava
from .data import epoch_order, llava_collator, llava_dataset
from .model_io import load_llava, save_llava, trainable_vision_tower
from .pretrain_vision import PretrainConfig, init_sincos_positions, pretrain_vision
from .questions import phrasebook
from .tower_cache import FrozenTowerFeatures, parse_pool_schedule, pool_at

TOKENIZER_PHRASE_REPEAT = 100  # weight of the task's phrasing in the tokenizer corpus


def synth_spec(seed: int = 0, hidden_size: int = 128) -> TinyLlavaSpec:
    """The shipped model: LLaVA-1.5's shapes (336 px, patch 14 -> 576 visual tokens), tiny widths.

    Decoder weights start at std 1/sqrt(width): HF's 0.02 suits width 4096 and, at width 128, leaves
    attention uniform over the 576 image tokens for hundreds of steps.
    """
    return TinyLlavaSpec(
        num_layers=6, hidden_size=hidden_size, num_heads=4, intermediate_size=4 * hidden_size,
        vision_hidden_size=128, vision_layers=4, vision_heads=4, vision_intermediate_size=512,
        vocab_size=768, tokenizer_extra_text=phrasebook(), tokenizer_extra_repeat=TOKENIZER_PHRASE_REPEAT,
        init_std=hidden_size ** -0.5, seed=seed,
    )


@dataclass
class TrainConfig:
    # defaults: the shipped recipe (eval_data/synth_llava/CARD.md, docs/synth.md), about 26 min on 2 CPU cores
    steps: int = 1700
    batch_size: int = 4
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    sincos_positions: bool = True  # start the CLIP position table from 2-D sin-cos values (as MAE)
    vision_steps: int = 200  # stage 0: steps of dense per-patch pretraining of the vision tower (0: none)
    vision_lr: float = 2e-3
    vision_position_targets: bool = False  # stage 0 also classifies each patch's row and column (pretrain_vision.py)
    tune_vision: bool = False  # train the vision tower in the LLaVA stage too (LLaVA itself keeps it frozen)
    pool_schedule: str = "4:200,2:150"  # curriculum "4:250,2:200": image patches averaged 4 x 4 for 250 steps, 2 x 2 for 200, then none
    questions_per_sample: int = 0  # > 0: conversations cut into records of this many questions (data.split_conversations)
    grounding_weight: float = 1.0  # > 0: add the word-region alignment loss (grounding.py), needs the frozen tower
    grounding_head: int = 0  # the head it supervises
    grounding_layer: int = 2  # the decoder layer of these heads (0: reads the embeddings, before any pruning)
    grounding_answer_heads: str = "1,2"  # (with grounding_weight > 0) at each answer position, head 1 attends to the first-named objects, head 2 to the second (grounding.answer_targets); same layer
    grounding_value_weight: float = 1.0  # > 0 (with grounding_weight > 0 and answer heads): their outputs must also carry x, colour and digit of what they read (answer_values.py)
    grounding_value_x_weight: float = 4.0  # weight of x's squared error against the colour and digit squared errors in that loss
    projector_init: str = "data"  # "data": init_projector_from_features; "default": LLaVA's nn.Linear init
    vision_from: str = ""  # a checkpoint whose vision tower to start from (no sin-cos init, no stage 0)
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


def grounded_losses(model, batch: dict, scenes: list[dict], word_ids: dict[int, str], pool: int,
                    head: int, layer: int = 0, answer_heads: tuple[int, ...] = (),
                    prompt_end_id: int | None = None, value_probe=None,
                    value_x_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LLaVA's task loss, the alignment loss of question words and, with answer_heads, of answer positions,
    the answer heads' value loss with `value_probe`, else 0) of one batch of cached tower features."""
    from llava.constants import IMAGE_TOKEN_INDEX

    from .grounding import answer_targets, grounding_loss, grounding_targets, image_token_positions

    grid = math.isqrt(batch["images"].shape[1])
    targets = grounding_targets(batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, grid, pool)
    if answer_heads:
        if prompt_end_id is None:
            raise ValueError("answer heads need prompt_end_id (grounding.prompt_end_token_id(tokenizer))")
        targets = targets + answer_targets(
            batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, grid, pool, answer_heads, prompt_end_id)
    _, position_ids, attention_mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                output_hidden_states=layer > 0)
    hidden = embeds if layer == 0 else out.hidden_states[layer]  # [B, N, D] the input of decoder layer `layer`
    starts = image_token_positions(batch["input_ids"], IMAGE_TOKEN_INDEX)  # [B]
    value = hidden.sum() * 0
    if value_probe is not None:
        from .answer_values import value_loss, value_targets

        value = value_loss(model, value_probe, hidden, value_targets(
            batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, grid, pool, answer_heads,
            prompt_end_id), layer, value_x_weight)
    return out.loss, grounding_loss(model, hidden, starts, targets, head, layer), value


def train_steps(model, dataset, collate, cfg: TrainConfig, log_path: str | None = None,
                eval_fn=None, scenes: dict | None = None) -> list[dict]:
    """Run cfg.steps AdamW steps over `dataset`; returns the loss log.

    cfg.tune_vision: the vision tower trains too; otherwise it stays frozen and its features are
    computed once per image (`FrozenTowerFeatures`), pooled as cfg.pool_schedule says.
    `eval_fn()` (-> dict), if given, runs every cfg.eval_every steps and is logged.
    """
    model.train()
    log, t0, c0 = [], time.time(), time.process_time()
    schedule = parse_pool_schedule(cfg.pool_schedule)
    if cfg.tune_vision and schedule:
        raise ValueError("pooled curriculum steps need the frozen tower: set tune_vision to false")
    cached = None if cfg.tune_vision else FrozenTowerFeatures(model, dataset)
    if cfg.grounding_weight < 0:
        raise ValueError(f"grounding_weight must be >= 0 (0: no alignment loss), got {cfg.grounding_weight}")
    if cfg.grounding_weight and (cached is None or scenes is None):
        raise ValueError("the grounding loss needs the frozen tower (tune_vision false) and the split's scenes")
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    from .grounding import parse_heads

    answer_heads = parse_heads(cfg.grounding_answer_heads)
    if cfg.grounding_weight and not (0 <= cfg.grounding_layer < layers and 0 <= cfg.grounding_head < heads
                                     and all(0 <= h < heads for h in answer_heads)):
        raise ValueError(f"grounding layer {cfg.grounding_layer} / head {cfg.grounding_head} / answer heads "
                         f"{answer_heads} is not in this model ({layers} layers of {heads} heads): pass "
                         f"--grounding-layer in [0, {layers}) and heads in [0, {heads})")
    if cfg.grounding_value_weight < 0 or cfg.grounding_value_x_weight < 0:
        raise ValueError(f"grounding_value_weight {cfg.grounding_value_weight} and grounding_value_x_weight "
                         f"{cfg.grounding_value_x_weight} must be >= 0 (0: no value target)")
    grounding, probe = None, None
    if cfg.grounding_value_weight and cfg.grounding_weight and answer_heads:  # the answer heads' value target
        from .answer_values import ValueProbe

        probe = ValueProbe(model.config.hidden_size // heads, answer_heads)  # trained here, not saved
    if cfg.grounding_weight:
        from .grounding import prompt_end_token_id, word_token_ids

        grounding = {"word_ids": word_token_ids(dataset.tokenizer), "prompt_end_id": prompt_end_token_id(dataset.tokenizer),
                     "scenes": [scenes[rec["image"]] for rec in dataset.list_data_dict]}
    context = trainable_vision_tower(model) if cfg.tune_vision else cached.installed()
    with context:
        params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        bar = tqdm(batches(len(dataset), cfg), total=cfg.steps, desc="train")
        for step, idx in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if cached:
                cached.pool = pool_at(step, schedule)
            # input_ids/labels (B, T); images (B, 3, H, W), or tower features (B, P, C) when frozen
            batch = cached.batch(idx, collate) if cached else collate([dataset[i] for i in idx])
            if grounding is None:
                loss = model(**batch).loss
            else:
                task_loss, align_loss, value_loss = grounded_losses(
                    model, batch, [grounding["scenes"][i] for i in idx], grounding["word_ids"], cached.pool,
                    cfg.grounding_head, cfg.grounding_layer, answer_heads, grounding["prompt_end_id"], probe,
                    cfg.grounding_value_x_weight)
                loss = task_loss + cfg.grounding_weight * align_loss + cfg.grounding_value_weight * value_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                rec = {"step": step, "loss": round(loss.item(), 5),
                       **({"align_loss": round(align_loss.item(), 4)} if grounding else {}),
                       **({"value_loss": round(value_loss.item(), 4)} if probe else {}), "lr": lr_at(step, cfg),
                       "elapsed_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
                if cached and cached.pool > 1:
                    rec["pool"] = cached.pool
                if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step:
                    rec["eval"] = eval_fn()
                log.append(rec)
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    model.eval()
    return log


@torch.no_grad()
def init_projector_from_features(model, dataset, num_images: int = 32, seed: int = 0) -> dict:
    """Data-dependent start of the mlp2x_gelu projector (LSUV-style), on tower features of `num_images`.

    CLIP's penultimate features share a large common component (norm ~30 against ~10 of variation
    between patches), so a default-initialised projector gives image tokens that all look alike to
    attention, and the decoder spends its budget mean-pooling the image. Here the first linear layer
    subtracts the mean feature and gives unit variance per unit; the second is scaled so image tokens
    have the spread of the text embeddings. Returns the statistics used.
    """
    proj = model.get_model().mm_projector
    lin1, lin2 = proj[0], proj[-1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:num_images].tolist()
    images = torch.stack([dataset[i]["image"] for i in idx])  # [n, 3, H, W]
    feats = model.get_vision_tower()(images).flatten(0, 1).float()  # [n * P, C]
    mean = feats.mean(0)  # [C]
    std1 = ((feats - mean) @ lin1.weight.T).std(0)  # [C1]
    lin1.weight.div_(std1[:, None])
    lin1.bias.copy_(-lin1.weight @ mean)
    hidden = proj[:-1](feats)  # [n * P, C1]
    out_std = (hidden @ lin2.weight.T).std(0).mean()
    text_std = model.get_model().embed_tokens.weight.std()
    lin2.weight.mul_(text_std / out_std)
    lin2.bias.zero_()
    return {"images": num_images, "feature_norm": round(float(feats.norm(dim=-1).mean()), 3),
            "mean_norm": round(float(mean.norm()), 3), "text_embedding_std": round(float(text_std), 4)}


def load_vision_tower(model, ckpt: str) -> None:
    """Copy the CLIP weights of checkpoint `ckpt` (its vision_tower/ folder) into `model`'s tower."""
    from transformers import CLIPVisionModel

    folder = os.path.join(ckpt, "vision_tower")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} not found: --vision-from takes a checkpoint saved by this trainer")
    clip = model.get_vision_tower().vision_tower
    clip.load_state_dict(CLIPVisionModel.from_pretrained(folder, torch_dtype=torch.float32).state_dict())


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
        dataset = llava_dataset(data_dir, tokenizer, image_processor, spec.image_aspect_ratio, cfg.questions_per_sample)
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, "train_log.jsonl")
        if os.path.exists(log_path):
            os.remove(log_path)
        if cfg.vision_from:
            load_vision_tower(model, cfg.vision_from)
        elif cfg.sincos_positions:
            init_sincos_positions(model.get_vision_tower().vision_tower)
        if cfg.vision_steps and not cfg.vision_from:
            pretrain_vision(model.get_vision_tower(), data_dir,
                            PretrainConfig(steps=cfg.vision_steps, lr=cfg.vision_lr, seed=cfg.seed,
                                           position_targets=cfg.vision_position_targets), log_path)
        projector_stats = None
        if cfg.projector_init == "data":
            projector_stats = init_projector_from_features(model, dataset, seed=cfg.seed)
        elif cfg.projector_init != "default":
            raise ValueError(f"projector_init must be 'data' or 'default', got {cfg.projector_init!r}")
        eval_fn = None
        if test_dir is not None:
            preds = os.path.join(out_dir, "quick_eval_predictions.jsonl")
            eval_fn = lambda: quick_eval(model, tokenizer, image_processor, test_dir, cfg.eval_limit, preds)  # noqa: E731
        scenes = None
        if cfg.grounding_weight:
            from .evaluate import read_jsonl

            scenes = {row["image"]: row for row in read_jsonl(os.path.join(data_dir, "scenes.jsonl"))}
        log = train_steps(model, dataset, llava_collator(tokenizer), cfg, log_path, eval_fn, scenes)
        save_llava(model, tokenizer, out_dir, getattr(torch, cfg.save_dtype), spec_from=init_dir)
    spec_record = {k: v for k, v in asdict(spec).items() if k != "tokenizer_extra_text"}
    meta_path = os.path.join(data_dir, "meta.json")
    data_seed = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            data_seed = json.load(f)["seed"]
    record = {"data": os.path.abspath(data_dir), "data_seed": data_seed, "num_scenes": len(dataset), "train": asdict(cfg),
              "spec": spec_record, "projector_init": projector_stats, "wall_s": round(time.time() - t0, 1),
              "cpu_s": round(time.process_time() - c0, 1), "final_loss": log[-1]["loss"],
              "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    with open(os.path.join(out_dir, "train_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


CLI_FIELDS = ("steps", "batch_size", "lr", "warmup_steps", "seed", "threads", "sincos_positions", "vision_steps",
              "vision_lr", "vision_position_targets", "tune_vision", "pool_schedule", "questions_per_sample", "grounding_weight", "grounding_head", "grounding_layer", "grounding_answer_heads", "grounding_value_weight", "grounding_value_x_weight", "projector_init", "vision_from", "eval_every", "eval_limit")


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
