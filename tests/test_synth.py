"""Synthetic scenes (determinism, LLaVA formats, answers by construction) and the tiny-LLaVA trainer."""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import re

import pytest
import torch

from llava_fitprune.synth.draw import COLOURS, render
from llava_fitprune.synth.questions import PLURAL, QUESTION_TYPES, SUFFIX
from llava_fitprune.synth.scenes import SceneConfig, make_example, write_dataset, write_split

SEED = 7


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- generator -------------------------------------------------------------------------------

def test_same_seed_same_files_other_seed_other_files(tmp_path):
    for name in ("a", "b"):
        write_dataset(str(tmp_path / name), num_train=3, num_test=2, seed=SEED)
    write_dataset(str(tmp_path / "c"), num_train=3, num_test=2, seed=SEED + 1)
    for sub in ("train", "test", "train/images", "test/images"):
        names = sorted(n for n in os.listdir(tmp_path / "a" / sub) if (tmp_path / "a" / sub / n).is_file())
        assert names
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / sub, tmp_path / "b" / sub, names, shallow=False)
        assert not mismatch and not errors, (sub, mismatch, errors)
    assert (tmp_path / "a/train/images/000000.png").read_bytes() != (tmp_path / "c/train/images/000000.png").read_bytes()


def test_splits_disjoint_and_independent_of_each_others_size(tmp_path):
    write_dataset(str(tmp_path / "a"), num_train=2, num_test=2, seed=SEED)
    write_dataset(str(tmp_path / "b"), num_train=0, num_test=2, seed=SEED)
    assert filecmp.cmp(tmp_path / "a/test/answers.jsonl", tmp_path / "b/test/answers.jsonl", shallow=False)
    train, test = make_example(SEED, "train", 0, SceneConfig()), make_example(SEED, "test", 0, SceneConfig())
    assert train[0] != test[0]


def test_bad_split_sizes_raise(tmp_path):
    with pytest.raises(ValueError, match="not both 0"):
        write_dataset(str(tmp_path), 0, 0, SEED)
    with pytest.raises(ValueError, match=">= 0"):
        write_dataset(str(tmp_path), -1, 3, SEED)
    with pytest.raises(ValueError, match="split must be"):
        write_split(str(tmp_path), "val", 3, SEED)


def test_every_question_type_and_single_word_answers(split):
    qs, ans = _rows(os.path.join(split, "questions.jsonl")), _rows(os.path.join(split, "answers.jsonl"))
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in ans]
    assert {q["category"] for q in qs} == set(QUESTION_TYPES)
    assert all(len(a["answer"].split()) == 1 for a in ans)
    assert all(q["text"].endswith(SUFFIX) and "<image>" not in q["text"] for q in qs)


def _derive(scene: dict, question: str) -> str:
    """An independent reading of a question against the recorded layout."""
    sh = scene["shapes"]
    if m := re.match(r"What colour is the (\w+)\?", question):
        (obj,) = [s for s in sh if s["shape"] == m[1]]
        return obj["colour"]
    if m := re.match(r"How many (\w+) shapes are there\?", question):
        return str(sum(s["colour"] == m[1] for s in sh))
    if m := re.match(r"How many (\w+) are there\?", question):
        shape = {v: k for k, v in PLURAL.items()}[m[1]]
        return str(sum(s["shape"] == shape for s in sh))
    if m := re.match(r"Is the (\w+) to the left or right of the (\w+)\?", question):
        (a,) = [s for s in sh if s["shape"] == m[1]]  # named by type: one shape of each
        (b,) = [s for s in sh if s["shape"] == m[2]]
        assert abs(a["cx"] - b["cx"]) >= SceneConfig().min_dx
        return "left" if a["cx"] < b["cx"] else "right"
    if question.startswith("What number is written"):
        return scene["text"]["value"]
    raise AssertionError(f"unparsed question {question!r}")


def test_answers_rederived_from_layout(split):
    scenes = {s["id"]: s for s in _rows(os.path.join(split, "scenes.jsonl"))}
    qs, ans = _rows(os.path.join(split, "questions.jsonl")), _rows(os.path.join(split, "answers.jsonl"))
    for q, a in zip(qs, ans):
        scene = scenes[q["question_id"].rsplit("_", 1)[0]]
        assert _derive(scene, q["text"][: -len(SUFFIX)]) == a["answer"], q


def test_training_relation_questions_cannot_answer_each_other(tmp_path):
    """Within a training conversation the left/right pairs form a forest: no reversed pair, no cycle."""
    import json as _json

    from llava_fitprune.synth.questions import forest_pairs

    rng = random.Random(0)
    for _ in range(200):
        pairs = [(i, j) for i in range(5) for j in range(5) if i != j and rng.random() < 0.6]
        chosen = forest_pairs(pairs, rng, k=10)
        assert set(chosen) <= set(pairs) and len({frozenset(p) for p in chosen}) == len(chosen)
        nodes = {n for p in chosen for n in p}
        assert len(chosen) <= max(0, len(nodes) - 1)  # a forest: edges < nodes in every component
        if pairs:
            assert chosen  # never empty when a pair exists
    d = write_split(str(tmp_path), "train", 30, SEED)
    with open(os.path.join(d, "conversations.json")) as f:
        convs = _json.load(f)
    multi = 0
    for conv in convs:
        named = [tuple(re.search(r"Is the (\w+) to the left or right of the (\w+)\?", t["value"]).groups())
                 for t in conv["conversations"][::2] if "left or right" in t["value"]]
        shapes = {s for p in named for s in p}
        assert named and len(named) <= len(shapes) - 1, named
        multi += len(named) > 1
    assert multi  # more than one relation question in some conversations


def test_rendered_colours_at_recorded_positions(split):
    from PIL import Image

    for s in _rows(os.path.join(split, "scenes.jsonl")):
        img = Image.open(os.path.join(split, "images", s["image"]))
        assert img.size == (SceneConfig().image_size,) * 2
        for obj in s["shapes"]:
            assert img.getpixel((round(obj["cx"]), round(obj["cy"]))) == COLOURS[obj["colour"]], obj


def test_objects_fill_separate_blocks_of_the_patch_grid(split):
    cfg = SceneConfig()
    for s in _rows(os.path.join(split, "scenes.jsonl")):
        objs = s["shapes"] + [s["text"]]
        for o in objs:
            r, c, k = o["cells"]
            assert 0 <= r and 0 <= c and r + k <= cfg.grid and c + k <= cfg.grid
            assert (o["cx"], o["cy"]) == ((c + k / 2) * cfg.patch_size, (r + k / 2) * cfg.patch_size)
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                (ra, ca, ka), (rb, cb, kb) = a["cells"], b["cells"]
                apart = max(rb - (ra + ka), ra - (rb + kb), cb - (ca + ka), ca - (cb + kb))
                assert apart >= cfg.gap_cells, (a, b)


def test_patch_targets_label_the_blocks(split):
    from llava_fitprune.synth.pretrain_vision import IGNORE, KINDS, patch_targets

    cfg = SceneConfig()
    for s in _rows(os.path.join(split, "scenes.jsonl")):
        t = patch_targets(s, cfg.image_size, cfg.patch_size, min_pixels=8).view(cfg.grid, cfg.grid, 3)
        for o in s["shapes"]:
            r, c, k = o["cells"]
            block = t[r:r + k, c:c + k].reshape(-1, 3)
            labelled = block[block[:, 0] > 0]
            assert len(labelled) and (labelled[:, 0] == KINDS.index(o["shape"])).all()
            assert (labelled[:, 1] == list(COLOURS).index(o["colour"])).all()
            if o["shape"] == "square":
                assert len(labelled) == k * k
        r, c, k = s["text"]["cells"]
        block = t[r:r + k, c:c + k].reshape(-1, 3)
        assert (block[block[:, 0] > 0][:, 2] == int(s["text"]["value"])).all()
        assert (t[..., 0] > 0).sum() < (t[..., 0] == 0).sum() and (t[t[..., 0] == 0][:, 1:] == IGNORE).all()


def test_render_rejects_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape"):
        render({"shapes": [{"shape": "hexagon", "colour": "red", "cx": 9, "cy": 9, "size": 9}]}, 32)


# --- LLaVA's loaders read the files ----------------------------------------------------------

def test_llava_train_dataset_masks_all_but_answers(split, tiny2):
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava_fitprune.synth.data import llava_dataset

    _, (tok, model, proc) = tiny2
    ds = llava_dataset(split, tok, proc)
    convs = json.load(open(os.path.join(split, "conversations.json")))
    for i, conv in enumerate(convs):
        item = ds[i]
        assert item["image"].shape == (3, SceneConfig().image_size, SceneConfig().image_size)
        assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
        supervised = tok.decode(item["labels"][item["labels"] != IGNORE_INDEX])
        answers = [t["value"] for t in conv["conversations"][1::2]]
        assert all(len(a.split()) == 1 for a in answers)  # no description turn by default (it leaks)
        assert [t.strip() for t in supervised.split("</s>")[:-1]] == [": " + a for a in answers]


def test_model_vqa_loader_reads_questions(split, tiny2, monkeypatch):
    import llava.eval.model_vqa_loader as mvl

    _, (tok, model, proc) = tiny2
    monkeypatch.setattr(mvl, "args", argparse.Namespace(conv_mode="vicuna_v1"), raising=False)
    qs = _rows(os.path.join(split, "questions.jsonl"))
    ds = mvl.CustomDataset(qs, os.path.join(split, "images"), tok, proc, model.config)
    ids, image, size = ds[0]
    assert image.shape[-1] == SceneConfig().image_size and size == (SceneConfig().image_size,) * 2
    assert ids.ndim == 1


# --- training and evaluation -----------------------------------------------------------------

def _loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


def test_training_steps_lower_loss_and_train_the_vision_tower(short_split, tiny2):
    from llava_fitprune.synth.data import llava_collator, llava_dataset
    from llava_fitprune.synth.train import TrainConfig, train_steps

    _, (tok, model, proc) = tiny2
    torch.manual_seed(0)
    ds = llava_dataset(short_split, tok, proc)
    collate = llava_collator(tok)
    tiny_set = [ds[0], ds[1]]
    batch = collate(tiny_set)
    tower = model.get_vision_tower()
    patch_before = tower.vision_tower.vision_model.embeddings.patch_embedding.weight.clone()
    before = _loss(model, batch)
    cfg = TrainConfig(steps=4, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, tune_vision=True, pool_schedule="",
                      grounding_weight=0.0)
    log = train_steps(model, tiny_set, collate, cfg)
    after = _loss(model, batch)
    assert len(log) == cfg.steps and after < 0.9 * before, (before, after)
    assert model.get_vision_tower() is tower  # the grad wrapper is gone again
    assert not torch.equal(patch_before, tower.vision_tower.vision_model.embeddings.patch_embedding.weight)


def test_frozen_tower_features_give_the_stock_loss_and_are_computed_once(short_split, tiny2):
    """The cached-feature path (tower run once per image, projector at each step) is the stock forward."""
    from llava_fitprune.synth.data import llava_collator, llava_dataset
    from llava_fitprune.synth.tower_cache import FrozenTowerFeatures

    _, (tok, model, proc) = tiny2
    ds = llava_dataset(short_split, tok, proc)
    collate = llava_collator(tok)
    stock = _loss(model, collate([ds[0], ds[1]]))
    cached = FrozenTowerFeatures(model, ds)
    with cached.installed():
        batch = cached.batch([0, 1], collate)
        assert batch["images"].shape == (2, 576, model.config.mm_hidden_size)  # tower features, not pixels
        assert abs(_loss(model, batch) - stock) < 1e-5 * max(1.0, abs(stock))
        first = cached.items[0]["features"]
        cached.batch([1, 0], collate)
        assert cached.items[0]["features"] is first  # not recomputed
    assert "encode_images" not in vars(model)  # the instance shortcut is gone; the class is untouched


def test_pool_patches_averages_grid_neighbourhoods():
    from llava_fitprune.synth.tower_cache import pool_patches

    side, C = 4, 3
    grid = torch.arange(side * side, dtype=torch.float32).view(1, side * side, 1).expand(1, -1, C)  # value = index
    pooled = pool_patches(grid, 2)  # [1, 4, C]
    expected = torch.tensor([(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4])
    torch.testing.assert_close(pooled[0, :, 0], expected)
    assert pool_patches(grid, 1) is grid
    with pytest.raises(ValueError, match="cannot pool"):
        pool_patches(grid, 3)


def test_pool_schedule():
    from llava_fitprune.synth.tower_cache import parse_pool_schedule, pool_at

    schedule = parse_pool_schedule("4:3, 2:2")
    assert schedule == [(4, 3), (2, 2)] and parse_pool_schedule("") == []
    assert [pool_at(s, schedule) for s in range(7)] == [4, 4, 4, 2, 2, 1, 1]
    for bad in ("4", "4:x", "0:5"):
        with pytest.raises(ValueError, match="pool schedule entry"):
            parse_pool_schedule(bad)


def test_projector_data_init_centres_and_scales_image_tokens(split, tiny2, tmp_path):
    from llava_fitprune.synth.data import llava_dataset
    from llava_fitprune.synth.model_io import load_llava
    from llava_fitprune.synth.train import init_projector_from_features

    path, _ = tiny2
    tok, model, proc = load_llava(path)  # a fresh copy: this test changes the projector
    ds = llava_dataset(split, tok, proc)
    n = len(ds)  # every image: the statistics below are over the same ones
    stats = init_projector_from_features(model, ds, num_images=n)
    assert stats["mean_norm"] > 0 and stats["images"] == n
    with torch.no_grad():
        feats = model.get_vision_tower()(torch.stack([ds[i]["image"] for i in range(n)])).flatten(0, 1)
        hidden = model.get_model().mm_projector[0](feats)  # [n, C1]: centred, unit variance per unit
        out = model.get_model().mm_projector(feats)  # [n, D]
    assert hidden.mean(0).abs().max() < 1e-3 and (hidden.std(0) - 1).abs().max() < 1e-3
    text_std = model.get_model().embed_tokens.weight.std()
    assert abs(out.std(0).mean() / text_std - 1) < 1e-3


def test_training_is_deterministic(short_split, tiny2):
    """Same seed, same data, same threads: the same weights (the card's reproducibility rests on it)."""
    from llava_fitprune.synth.data import llava_collator, llava_dataset
    from llava_fitprune.synth.model_io import load_llava
    from llava_fitprune.synth.train import TrainConfig, seed_everything, train_steps

    path, _ = tiny2
    weights = []
    for _ in range(2):
        seed_everything(3, torch.get_num_threads())
        tok, model, proc = load_llava(path)
        ds = llava_dataset(short_split, tok, proc)
        train_steps(model, [ds[0], ds[1]], llava_collator(tok),
                    TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=1, pool_schedule="2:1", grounding_weight=0.0))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    torch.use_deterministic_algorithms(False)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], v) for k, v in load_llava(path)[1].state_dict().items()
               if k in weights[0])


def test_vision_pretraining_trains_the_tower_and_refreezes_it(split, tiny2):
    from llava_fitprune.synth.pretrain_vision import PretrainConfig, init_sincos_positions, pretrain_vision

    _, (tok, model, proc) = tiny2
    clip = model.get_vision_tower().vision_tower
    init_sincos_positions(clip)
    pos = clip.vision_model.embeddings.position_embedding.weight.detach()  # (1 + side * side, hidden)
    side = clip.config.image_size // clip.config.patch_size
    assert not pos[0].any() and pos.shape[0] == 1 + side * side
    near, far = pos[1] @ pos[2], pos[1] @ pos[side * side]  # neighbours look alike, far corners do not
    assert near > far
    patch = clip.vision_model.embeddings.patch_embedding.weight
    before = patch.clone()
    log = pretrain_vision(model.get_vision_tower(), split, PretrainConfig(steps=2, batch_size=2, log_every=1))
    assert len(log) == 2 and {"kind_acc", "colour_acc"} <= set(log[0])
    assert not torch.equal(before, patch)
    assert not any(p.requires_grad for p in clip.parameters())


def test_position_targets_are_each_patchs_row_and_column(split, tiny2):
    from llava_fitprune.synth.pretrain_vision import PretrainConfig, patch_positions, pretrain_vision

    pos = patch_positions(3)
    assert pos.tolist() == [[r, c] for r in range(3) for c in range(3)]  # row-major, as CLIP's patches
    _, (_, model, _) = tiny2
    log = pretrain_vision(model.get_vision_tower(), split,
                          PretrainConfig(steps=2, batch_size=2, log_every=1, position_targets=True))
    assert {"row_acc", "column_acc", "kind_acc"} <= set(log[0])


def test_saved_checkpoint_loads_by_path_and_evaluates(split, tiny2, tmp_path):
    from llava_fitprune import load_pretrained_model
    from llava_fitprune.synth.evaluate import evaluate, evaluate_checkpoint
    from llava_fitprune.synth.model_io import save_llava

    _, (tok, model, proc) = tiny2
    out = save_llava(model, tok, str(tmp_path / "llava-synth-saved"), torch.float16)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["mm_vision_tower"] == "vision_tower" and cfg["torch_dtype"] == "float16"
    tok2, ours, proc2, _ = load_pretrained_model(out, None, "llava-synth-saved", device="cpu")
    w = model.get_model().layers[0].mlp.up_proj.weight
    assert torch.allclose(ours.get_model().layers[0].mlp.up_proj.weight, w.half().float())
    clip = ours.get_vision_tower().vision_tower.vision_model.embeddings.patch_embedding.weight
    assert torch.allclose(clip, model.get_vision_tower().vision_tower.vision_model.embeddings.patch_embedding.weight.half().float())

    qs, ans = os.path.join(split, "questions.jsonl"), os.path.join(split, "answers.jsonl")
    res = evaluate(ours, tok2, proc2, qs, ans, os.path.join(split, "images"), limit=4, progress=False,
                   max_new_tokens=2, predictions_file=str(tmp_path / "pred.jsonl"))
    assert res["overall"]["total"] == 4 and sum(v["total"] for k, v in res.items() if k != "overall") == 4
    assert len(_rows(tmp_path / "pred.jsonl")) == 4
    stock = evaluate_checkpoint(out, os.path.dirname(qs), limit=4, progress=False, max_new_tokens=2)
    assert stock == res  # LLaVA's own class and the pruning-aware one (dense) answer alike


def test_evaluate_reports_missing_image_and_answers(split, tiny2, tmp_path):
    from llava_fitprune.synth.evaluate import evaluate

    _, (tok, model, proc) = tiny2
    q = _rows(os.path.join(split, "questions.jsonl"))[0]
    a = {"question_id": q["question_id"], "answer": "x"}
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate(model, tok, proc, [dict(q, image="nope.png")], [a], os.path.join(split, "images"), progress=False)
    with pytest.raises(ValueError, match="no answer"):
        evaluate(model, tok, proc, [q], [], os.path.join(split, "images"), progress=False)
