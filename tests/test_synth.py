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


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("synth")), "train", 6, SEED)


@pytest.fixture(scope="module")
def short_split(tmp_path_factory):
    """Two scenes with one question per type: short sequences for the training test."""
    return write_split(str(tmp_path_factory.mktemp("synth")), "train", 2, SEED, SceneConfig(train_per_type=1))


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """A 2-layer tiny LLaVA (336 px, 576 visual tokens) loaded with LLaVA's class."""
    from llava_fitprune.synth.model_io import load_llava
    from llava_fitprune.synth.questions import phrasebook
    from llava_fitprune.tiny import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec(num_layers=2, hidden_size=64, intermediate_size=128, vision_layers=1,
                         tokenizer_extra_text=phrasebook(), tokenizer_extra_repeat=20, init_std=None)
    path = build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-synth-2l"), spec)
    return path, load_llava(path)


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
    if m := re.match(r"Is the (\w+) (\w+) to the left or right of the (\w+) (\w+)\?", question):
        (a,) = [s for s in sh if (s["colour"], s["shape"]) == (m[1], m[2])]
        (b,) = [s for s in sh if (s["colour"], s["shape"]) == (m[3], m[4])]
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


def test_rendered_colours_at_recorded_positions(split):
    from PIL import Image

    for s in _rows(os.path.join(split, "scenes.jsonl")):
        img = Image.open(os.path.join(split, "images", s["image"]))
        assert img.size == (SceneConfig().image_size,) * 2
        for obj in s["shapes"]:
            assert img.getpixel((round(obj["cx"]), round(obj["cy"]))) == COLOURS[obj["colour"]], obj


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
        assert answers[-1].count(",") >= SceneConfig().min_shapes  # the training-only description closes it
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
    cfg = TrainConfig(steps=4, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1)
    log = train_steps(model, tiny_set, collate, cfg)
    after = _loss(model, batch)
    assert len(log) == cfg.steps and after < 0.9 * before, (before, after)
    assert model.get_vision_tower() is tower  # the grad wrapper is gone again
    assert not torch.equal(patch_before, tower.vision_tower.vision_model.embeddings.patch_embedding.weight)


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
