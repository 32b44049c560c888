"""Seeded synthetic visual-QA scenes in LLaVA's formats; CLI: python -m llava_fitprune.synth.scenes.

Each scene is a white image with a few coloured shapes and one written digit. Questions (colour of
a named shape, count of a shape/colour, left/right of two named shapes, the written digit) have
single-word answers derived from the recorded layout. A split directory holds:
  images/<index>.png      the rendered scenes
  conversations.json      one multi-turn record per scene, as LLaVA's train.py reads
  questions.jsonl         one line per question, as llava.eval.model_vqa_loader reads
  answers.jsonl           {"question_id", "answer", "category", "regions"} for scoring
  scenes.jsonl            the layout each answer was derived from
  meta.json               seed, sizes and config, to regenerate it
Scene `i` of split `s` depends only on (seed, s, i), so splits are disjoint and can be made apart.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass

from .draw import COLOURS, SHAPES, render
from .questions import SUFFIX, describe, make_questions, relation_pairs, unique_shape_types

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SceneConfig:
    image_size: int = 336
    patch_size: int = 14    # objects sit on LLaVA-1.5's patch grid: each covers a block of whole patches
    min_shapes: int = 3
    max_shapes: int = 6
    min_palette: int = 2    # colours a scene draws its shapes from (few colours -> repeated colours to count)
    max_palette: int = 4
    min_cells: int = 2      # a shape fills a k x k block of patches, k in [min_cells, max_cells]
    max_cells: int = 3
    margin: int = 2         # px between a shape and the edge of its block
    text_cells: int = 2     # the digit's block, k x k patches
    text_size: int = 28     # font size, px
    gap_cells: int = 1      # least number of empty patches between two objects' blocks
    min_dx: int = 28        # least horizontal distance between the centres of a left/right pair, px
    max_tries: int = 1000
    train_per_type: int = 6  # questions of each type per training scene (multi-turn)
    train_describe: bool = False  # end each training conversation with a left-to-right description
    # (off: the earlier turns give most of it away, so it teaches copying rather than looking)
    test_per_type: int = 1

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self.image_size // self.patch_size


def _overlaps(a: dict, b: dict, gap: int) -> bool:
    (ra, ca, ka), (rb, cb, kb) = a["cells"], b["cells"]
    return ra < rb + kb + gap and rb < ra + ka + gap and ca < cb + kb + gap and cb < ca + ka + gap


def _place(rng: random.Random, k: int, placed: list[dict], cfg: SceneConfig) -> dict | None:
    """A k x k block of patches free of the `placed` ones; its centre and box in px."""
    for _ in range(cfg.max_tries):
        r, c = rng.randrange(cfg.grid - k + 1), rng.randrange(cfg.grid - k + 1)
        obj = {"cells": [r, c, k]}
        if not any(_overlaps(obj, p, cfg.gap_cells) for p in placed):
            half = k * cfg.patch_size / 2
            return {"cx": c * cfg.patch_size + half, "cy": r * cfg.patch_size + half,
                    "size": k * cfg.patch_size - 2 * cfg.margin, "cells": [r, c, k]}
    return None


def _try_scene(rng: random.Random, cfg: SceneConfig) -> dict | None:
    text = _place(rng, cfg.text_cells, [], cfg)
    text.update(value=str(rng.randrange(10)), size=cfg.text_size)
    palette = rng.sample(tuple(COLOURS), rng.randint(cfg.min_palette, cfg.max_palette))
    shapes = []
    for _ in range(rng.randint(cfg.min_shapes, cfg.max_shapes)):
        obj = _place(rng, rng.randint(cfg.min_cells, cfg.max_cells), shapes + [text], cfg)
        if obj is None:
            return None
        obj.update(shape=rng.choice(SHAPES), colour=rng.choice(palette))
        shapes.append(obj)
    scene = {"shapes": shapes, "text": text}
    if not unique_shape_types(scene) or not relation_pairs(scene, cfg.min_dx):
        return None  # every question type must be askable
    return scene


def sample_scene(rng: random.Random, cfg: SceneConfig) -> dict:
    for _ in range(cfg.max_tries):
        scene = _try_scene(rng, cfg)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not sample a valid scene in {cfg.max_tries} tries: loosen {cfg}")


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"llava-fitprune-synth/{seed}/{split}/{index}")


def make_example(seed: int, split: str, index: int, cfg: SceneConfig) -> tuple[dict, list[dict]]:
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng, cfg)
    per_type = cfg.train_per_type if split == "train" else cfg.test_per_type
    return scene, make_questions(scene, rng, per_type, cfg.min_dx)


def conversation_record(qid: str, image: str, qas: list[dict], extra: list[dict] = ()) -> dict:
    """Multi-turn, every question as model_vqa_loader asks it (the image before the first).

    `extra` turns (the training-only description) come last, bare, so no earlier answer can read them.
    """
    asked = [(qa["text"] + SUFFIX, qa["answer"]) for qa in qas] + [(e["text"], e["answer"]) for e in extra]
    turns = []
    for k, (text, answer) in enumerate(asked):
        turns.append({"from": "human", "value": "<image>\n" + text if k == 0 else text})
        turns.append({"from": "gpt", "value": answer})
    return {"id": qid, "image": image, "conversations": turns}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_split(out_dir: str, split: str, num: int, seed: int, cfg: SceneConfig = SceneConfig()) -> str:
    """Render `num` scenes of `split` into out_dir/split; returns that directory."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num < 1:
        raise ValueError(f"a {split} split needs at least one scene, got {num}")
    d = os.path.join(out_dir, split)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    convs, questions, answers, scenes = [], [], [], []
    for i in range(num):
        scene, qas = make_example(seed, split, i, cfg)
        image = f"{i:06d}.png"
        render(scene, cfg.image_size).save(os.path.join(d, "images", image))
        sid = f"{split}_{i:06d}"
        extra = [describe(scene)] if split == "train" and cfg.train_describe else []
        convs.append(conversation_record(sid, image, qas, extra))
        scenes.append({"id": sid, "image": image, **scene})
        for k, qa in enumerate(qas):
            qid = f"{sid}_{k}"
            questions.append({"question_id": qid, "image": image, "text": qa["text"] + SUFFIX, "category": qa["category"]})
            answers.append({"question_id": qid, "answer": qa["answer"], "category": qa["category"], "regions": qa["regions"]})
    with open(os.path.join(d, "conversations.json"), "w") as f:
        json.dump(convs, f)
    _write_jsonl(os.path.join(d, "questions.jsonl"), questions)
    _write_jsonl(os.path.join(d, "answers.jsonl"), answers)
    _write_jsonl(os.path.join(d, "scenes.jsonl"), scenes)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"split": split, "num_scenes": num, "num_questions": len(questions), "seed": seed,
                   "config": asdict(cfg)}, f, indent=1)
    return d


def write_dataset(out_dir: str, num_train: int, num_test: int, seed: int, cfg: SceneConfig = SceneConfig()) -> None:
    if num_train < 0 or num_test < 0 or num_train + num_test == 0:
        raise ValueError(f"split sizes must be >= 0 and not both 0, got train={num_train} test={num_test}")
    for split, num in (("train", num_train), ("test", num_test)):
        if num:
            write_split(out_dir, split, num, seed, cfg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory; splits go to OUT/train and OUT/test")
    p.add_argument("--num-train", type=int, required=True, help="training scenes (0: none)")
    p.add_argument("--num-test", type=int, required=True, help="test scenes (0: none)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        write_dataset(a.out, a.num_train, a.num_test, a.seed)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
