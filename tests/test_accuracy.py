"""`llava-fitprune accuracy` on a tiny offline model: outputs, equal FLOPs, scores, dense == stock evaluate."""
from __future__ import annotations

import json
import os

import pytest

from llava_fitprune.synth.accuracy import data_seed, main

RATIOS = (0.2, 0.3)
METHODS = ("fitprune", "random", "uniform")
LIMIT = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 3-layer tiny LLaVA (336 px, 576 visual tokens) with the task's phrasing in its tokenizer."""
    from llava_fitprune.synth.questions import phrasebook
    from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec(num_layers=3, hidden_size=64, intermediate_size=128, vision_layers=1,
                         tokenizer_extra_text=phrasebook(), tokenizer_extra_repeat=20)
    return build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-synth-3l"), spec)


@pytest.fixture(scope="module")
def result(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("accuracy"))
    rc = main(["--checkpoint", ckpt, "--num-scenes", "2", "--limit", str(LIMIT), "--calibration-samples", "3",
               "--ratios", *map(str, RATIOS), "--methods", *METHODS, "--batch-size", "4", "--out-dir", out,
               "--threads", "1", "--convention", "total"])  # total: the achieved reduction is the ratio itself
    assert rc == 0
    with open(os.path.join(out, "accuracy.json")) as f:
        return out, json.load(f)


def test_writes_every_output_with_one_row_per_run(result):
    out, report = result
    for name in ("accuracy.md", "accuracy.csv", "accuracy.json", "accuracy.png", "predictions.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert (report["format"], report["version"]) == ("llava-fitprune-accuracy", 1)
    prov = report["provenance"]
    assert prov["data_seed"] == 0 and prov["data_seed_source"].startswith("default") and prov["model_sha256"]
    assert prov["calibration"]["split_dir"].endswith(os.path.join("train-seed0-n3", "train"))
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert len(ok) == 1 + len(METHODS) * len(RATIOS)
    assert [r["method"] for r in report["results"] if r["status"] == "n/a"] == ["lvprune"]
    with open(os.path.join(out, "accuracy.csv")) as f:
        assert len(f.read().strip().splitlines()) == 1 + len(report["results"])
    assert "'total' convention" in open(os.path.join(out, "accuracy.md")).read()


def test_methods_at_one_ratio_cost_equal_flops(result):
    _, report = result
    for ratio in RATIOS:
        got = [r["achieved_reduction"] for r in report["results"] if r["ratio"] == ratio and r["status"] == "ok"]
        assert len(got) == len(METHODS)
        assert max(got) - min(got) < 0.005, (ratio, got)  # within a token or two of each other
        assert abs(got[0] - ratio) < 0.02, (ratio, got)
    assert report["provenance"]["ratio_convention"] == "total"


def test_accuracies_match_the_predictions(result):
    from llava_fitprune.synth.evaluate import normalize

    out, report = result
    with open(os.path.join(out, "predictions.jsonl")) as f:
        preds = [json.loads(line) for line in f]
    for r in (x for x in report["results"] if x["status"] == "ok"):
        mine = [p for p in preds if (p["method"], p["ratio"]) == (r["method"], r["ratio"])]
        assert len(mine) == r["n"] == LIMIT
        assert all(p["correct"] == (normalize(p["text"]) == normalize(p["gold"])) for p in mine)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy"] == sum(p["correct"] for p in mine) / len(mine)
        for cat, v in r["per_category"].items():
            assert v["correct"] == sum(p["correct"] for p in mine if p["category"] == cat)


def test_dense_equals_stock_evaluate(result, ckpt, tmp_path):
    from llava_fitprune.synth.evaluate import evaluate_checkpoint

    out, report = result
    prov = report["provenance"]
    dense = next(r for r in report["results"] if r["method"] == "dense")
    stock = evaluate_checkpoint(ckpt, prov["split"], limit=LIMIT, progress=False,
                                max_new_tokens=prov["max_new_tokens"], predictions_file=str(tmp_path / "p.jsonl"))
    assert stock["overall"]["accuracy"] == dense["accuracy"]
    assert {k: v for k, v in stock.items() if k != "overall"} == dense["per_category"]
    with open(tmp_path / "p.jsonl") as f:
        stock_text = {p["question_id"]: p["text"] for p in map(json.loads, f)}
    with open(os.path.join(out, "predictions.jsonl")) as f:
        ours = {p["question_id"]: p["text"] for p in map(json.loads, f) if p["method"] == "dense"}
    assert ours == stock_text  # batched, left-padded, inputs built once == LLaVA's class one by one


@pytest.mark.parametrize("args, message", [
    (["--ratios", "1.5"], "outside [0, 1)"),
    (["--ratios", "-0.1"], "outside [0, 1)"),
    (["--methods", "fitprune", "magic"], "unknown method"),
    (["--methods", "lvprune"], "--lvprune-modules"),
    (["--limit", "0"], "must be >= 1"),
    (["--split", "/nonexistent"], "no questions.jsonl"),
])
def test_bad_arguments_are_argparse_errors(ckpt, args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", ckpt, "--out-dir", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_checkpoint_names_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "nope")])
    assert "llava_fitprune.synth.train" in capsys.readouterr().err


def test_data_seed_from_the_training_record(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"seed": 5}))
    (tmp_path / "train_record.json").write_text(json.dumps({"data": str(data)}))
    assert data_seed(str(tmp_path))[0] == 5
    (tmp_path / "train_record.json").write_text(json.dumps({"data": str(data), "data_seed": 3}))
    assert data_seed(str(tmp_path))[0] == 3


def test_comparison_is_paired_on_the_same_questions():
    from llava_fitprune.synth.accuracy_report import comparison

    right = {"fitprune": [1, 1, 1, 0], "uniform": [0, 1, 1, 1], "random": [0, 0, 1, 0]}
    preds = [{"method": m, "ratio": 0.8, "question_id": f"q{i}", "correct": bool(c)}
             for m, cs in right.items() for i, c in enumerate(cs)]
    results = [{"method": m, "ratio": 0.8} for m in right] + [{"method": "fitprune", "ratio": 0.5}]
    text = comparison(results, preds)
    # uniform: d = [1, 0, 0, -1], mean 0, SE = sqrt((2/4 - 0) / 3); random: d = [1, 1, 0, 0], mean 0.5,
    # SE = sqrt((2/4 - 1/4) / 3)
    assert "ratio 0.8: vs random: +0.500 (+-0.289; 2 won, 0 lost), vs uniform: +0.000 (+-0.408; 1 won, 1 lost)" in text
    assert "ratio 0.5" not in text  # below min_ratio
    assert "vs uniform: n/a" in comparison(results, [p for p in preds if p["method"] != "uniform"])


def test_cached_split_is_rebuilt_when_the_generator_changes(tmp_path, monkeypatch):
    from llava_fitprune.synth import accuracy
    from llava_fitprune.synth.scenes import SceneConfig

    first = accuracy.cached_split(str(tmp_path), "test", 2, 5, SceneConfig())
    questions = os.path.join(first, "questions.jsonl")
    os.utime(questions, (0, 0))  # a marker: rewriting the split resets it
    assert accuracy.cached_split(str(tmp_path), "test", 2, 5, SceneConfig()) == first
    assert os.path.getmtime(questions) == 0  # reused
    monkeypatch.setattr(accuracy, "generator_digest", lambda: "other source")
    assert accuracy.cached_split(str(tmp_path), "test", 2, 5, SceneConfig()) == first
    assert os.path.getmtime(questions) > 0  # written again by the (changed) generator


def test_max_pruning_layers_runs_fitprune_k(ckpt, tmp_path):
    """--max-pruning-layers K adds fitprune-kK: fitted with at most K pruning layers, at the same budget;
    a K above the model's layers is n/a with the reason."""
    out = str(tmp_path / "acc")
    assert main(["--checkpoint", ckpt, "--num-scenes", "2", "--limit", "4", "--calibration-samples", "3",
                 "--ratios", "0.5", "--methods", "fitprune", "--batch-size", "4", "--out-dir", out, "--threads", "1",
                 "--max-pruning-layers", "4", "1", "--convention", "total"]) == 0
    with open(os.path.join(out, "accuracy.json")) as f:
        report = json.load(f)
    rows = {r["method"]: r for r in report["results"]}
    assert [r["method"] for r in report["results"]] == ["dense", "fitprune", "fitprune-k1", "fitprune-k4", "lvprune"]
    assert report["provenance"]["max_pruning_layers"] == [1, 4]
    assert sum(d > 0 for d in rows["fitprune-k1"]["drop_per_layer"]) == 1
    assert abs(rows["fitprune-k1"]["achieved_reduction"] - 0.5) < 0.02  # the budget, at the questions' own prompts
    assert rows["fitprune-k4"]["status"] == "n/a" and "from 1 to 3" in rows["fitprune-k4"]["reason"]
    text = open(os.path.join(out, "accuracy.md")).read()
    assert "fitprune-k4 | 0.5 | n/a" in text and "ratio 0.5: fitprune-k1: " in text


def test_staged_comparison_is_paired_against_unconstrained_fitprune():
    from llava_fitprune.synth.accuracy_report import comparison

    right = {"fitprune": [1, 1, 0, 1], "fitprune-k2": [1, 0, 0, 1], "fitprune-k10": [1, 1, 1, 1]}
    preds = [{"method": m, "ratio": 0.7, "question_id": f"q{i}", "correct": bool(c)}
             for m, cs in right.items() for i, c in enumerate(cs)]
    text = comparison([{"method": m, "ratio": 0.7} for m in right], preds)
    # k2: d = [0, -1, 0, 0], mean -0.25, SE = sqrt((1/4 - 1/16) / 3); k10 (after k2): d = [0, 0, 1, 0]
    assert "ratio 0.7: fitprune-k2: -0.250 (+-0.250; 0 won, 1 lost), fitprune-k10: +0.250 (+-0.250; 1 won, 0 lost)" \
        in text
