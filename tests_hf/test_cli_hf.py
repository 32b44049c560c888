"""The command line through the transformers-native backend (issue #23 item 1), run in .venv-hf:
`fit` writes a recipe of the checkpoint's own depth that `load_pretrained` and the lmms-eval plugin
take (and that equals `core.fit.fit` on the same samples); `flops` reads each family's folder; `bench`
gives dense / FitPrune / oracle rows whose caches hold the schedule; `accuracy` on the synthetic
LLaVA converted to llava-hf answers every question as the LLaVA backend does; a haotian-liu
checkpoint is refused in one line naming the .venv command."""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess

import pytest
import torch

from conftest import IMAGE_SIZES, QUESTIONS, generate, image, make_inputs
from llava_fitprune.cli import main
from test_cross_backend import ROOT, llava_python

SYNTH = os.path.join(ROOT, "eval_data", "synth_llava", "checkpoint")
SYNTH_TEST = os.path.join(ROOT, "eval_data", "synth_llava", "test")


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory):
    """A LLaVA-format question file and image folder: 3 questions, images of two sizes."""
    d = tmp_path_factory.mktemp("calib")
    (d / "images").mkdir()
    with open(d / "q.jsonl", "w") as f:
        for s in range(3):
            image(s, IMAGE_SIZES[s % 2]).save(d / "images" / f"{s}.png")
            f.write(json.dumps({"question_id": f"q{s}", "image": f"{s}.png", "text": QUESTIONS[s % 2]}) + "\n")
    return d


@pytest.fixture(scope="module")
def fitted(tiny_paths, calib_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit_out")
    argv = ["fit", "--model-path", tiny_paths["qwen"], "--question-file", str(calib_files / "q.jsonl"),
            "--image-folder", str(calib_files / "images"), "--reduction-ratio", "0.3", "--num-samples", "3",
            "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    recipes = glob.glob(str(out / "*-fitprune-r0.3-total.json"))
    assert len(recipes) == 1 and os.path.isfile(out / "fit_report.json")
    return recipes[0]


@torch.no_grad()
def test_fit_writes_a_recipe_of_the_models_depth_that_the_api_and_plugin_take(tiny_paths, calib_files, fitted):
    from PIL import Image

    from llava_fitprune.adapters.hf import load_pretrained
    from llava_fitprune.adapters.hf.calibration import calibration_samples
    from llava_fitprune.core.fit import fit
    from llava_fitprune.core.recipe import load_recipe

    recipe = load_recipe(fitted)
    with open(os.path.join(tiny_paths["qwen"], "config.json")) as f:
        depth = json.load(f)["text_config"]["num_hidden_layers"]
    assert recipe.num_layers == depth and recipe.achieved_reduction >= 0.3 and sum(recipe.drop_per_layer) > 0
    model, processor = load_pretrained(tiny_paths["qwen"], recipe=fitted, attn_implementation="sdpa")
    # the command line's samples are the API's: the same recipe from core.fit on calibration_samples
    questions = [json.loads(l) for l in open(calib_files / "q.jsonl")]
    items = [(Image.open(calib_files / "images" / q["image"]).convert("RGB"), q["text"]) for q in questions]
    direct = fit(model, calibration_samples(model, processor, items), 0.3, progress=False, batch_size=2)
    assert direct.drop_per_layer == recipe.drop_per_layer
    generate(model, make_inputs(processor, [0, 1]), 2)
    assert model.fitprune_last.recipe_fingerprint == recipe.fingerprint()
    from llava_fitprune.lmms_eval_plugin.model import FitPruneQwen2_5_VL

    plugin = FitPruneQwen2_5_VL(pretrained=tiny_paths["qwen"], recipe=fitted, device="cpu")
    assert plugin.model.fitprune_recipe.fingerprint() == recipe.fingerprint()


@pytest.mark.parametrize("name", ["llava", "next", "qwen"])
def test_flops_reads_each_familys_checkpoint_folder(tiny_paths, capsys, name):
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(tiny_paths[name]).get_text_config(decoder=True)
    assert main(["flops", "--config", tiny_paths[name], "--visual-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{text.num_hidden_layers} layers, hidden {text.hidden_size}, MLP {text.intermediate_size}, heads " \
           f"{text.num_attention_heads}/{text.num_key_value_heads}" in out, out


def test_the_venvs_console_script_runs(tiny_paths):
    """`.venv-hf/bin/llava-fitprune` (setup.sh --hf installs this package --no-deps: the script must still exist)."""
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "llava-fitprune")
    run = subprocess.run([script, "flops", "--config", tiny_paths["qwen"], "--visual-tokens", "16"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "4 layers, hidden 64" in run.stdout, run.stderr[-2000:]


def test_bench_rows_through_the_hf_backend(tiny_paths, fitted, tmp_path, capsys):
    argv = ["bench", "--model", tiny_paths["qwen"], "--recipe", fitted, "--prompt-tokens", "4", "--visual-tokens",
            "40", "--text-tokens", "6", "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--threads", "1",
            "--out-dir", str(tmp_path), "--tag", "t"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["method"] for r in rows] == ["dense", "fitprune", "oracle"]
    dense, pruned, oracle = rows
    assert float(dense["kv_fraction"]) == 1 and float(pruned["flops_reduction"]) > 0
    for r in (pruned, oracle):  # the measured cache is the schedule's (bench_hf refuses a row whose is not)
        assert float(r["kv_fraction"]) == pytest.approx(float(r["kv_fraction_predicted"]))
        assert float(r["kv_fraction"]) < 1
    with pytest.raises(SystemExit) as e:  # LLaVA-only rows: one line
        main(argv + ["--methods", "stock"])
    assert e.value.code == 2 and "LLaVA" in capsys.readouterr().err


def test_llava_checkpoint_is_refused_with_the_llava_venv_command(capsys, tmp_path):
    argv = ["fit", "--model-path", SYNTH, "--question-file", "q.jsonl", "--image-folder", str(tmp_path),
            "--reduction-ratio", "0.5", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "haotian-liu LLaVA checkpoint" in err and f".venv/bin/llava-fitprune {' '.join(argv[:1] + argv[1:])}" in err


ACCURACY = ["--split", SYNTH_TEST, "--limit", "8", "--methods", "fitprune", "--ratios", "0.5",
            "--calibration-samples", "4", "--batch-size", "8", "--threads", "2"]


def test_accuracy_answers_every_question_as_the_llava_backend(tmp_path):
    python = llava_python()
    if python is None:
        pytest.skip("the LLaVA backend's venv (llava-torch) is not installed: set LLAVA_PYTHON")
    llava_out, hf_out = tmp_path / "llava", tmp_path / "hf"
    run = subprocess.run([python, "-m", "llava_fitprune.cli", "accuracy", "--checkpoint", SYNTH, *ACCURACY,
                          "--out-dir", str(llava_out)], env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["accuracy", "--convert-from", SYNTH, "--checkpoint", str(tmp_path / "synth-hf"), *ACCURACY,
                 "--out-dir", str(hf_out)]) == 0

    def answers(out):
        rows = [json.loads(l) for l in open(out / "predictions.jsonl")]
        return {(r["method"], r["ratio"], r["question_id"]): (r["text"], r["correct"]) for r in rows}

    ours, theirs = answers(hf_out), answers(llava_out)
    assert len(theirs) == 16 and {m for m, _, _ in theirs} == {"dense", "fitprune"}
    assert ours == theirs
    assert len({t for t, _ in theirs.values()}) > 1, "one answer for every question would make the check weak"
    # the same table. The fits agree up to float noise: the same alpha; a layer's drop rounded from a mean
    # fraction that sits at .5 may move one token to its neighbour (seen: [41, 50, 248] vs [41, 49, 249] with 4
    # samples, statistics equal to ~1e-6), so FLOPs columns agree to 1e-3 (llava-hf's LM head also has one more
    # row, <image>)
    prov = lambda out: json.load(open(out / "accuracy.json"))["provenance"]
    for key in ("reference_text_tokens", "visual_tokens", "max_new_tokens"):  # the same prompts, token for token
        assert prov(hf_out)[key] == prov(llava_out)[key], key
    for key in ("question_ids", "reference_text_tokens"):  # the same calibration questions and prompts
        assert prov(hf_out)["calibration"][key] == prov(llava_out)["calibration"][key], key
    table = lambda out: [{k: r.get(k) for k in ("method", "ratio", "accuracy", "per_category", "status")}
                         for r in json.load(open(out / "accuracy.json"))["results"]]
    assert table(hf_out) == table(llava_out)
    reductions = lambda out: [r["achieved_reduction"] for r in json.load(open(out / "accuracy.json"))["results"]
                              if "achieved_reduction" in r]
    assert reductions(hf_out) == pytest.approx(reductions(llava_out), abs=1e-3)
    recipe = lambda out: json.load(open(out / "accuracy.json"))["fitprune_recipes"]["0.5"]
    ours, theirs = recipe(hf_out), recipe(llava_out)
    assert ours["provenance"]["alpha"] == theirs["provenance"]["alpha"]
    assert max(abs(a - b) for a, b in zip(ours["drop_per_layer"], theirs["drop_per_layer"])) <= 1
    assert abs(sum(ours["drop_per_layer"]) - sum(theirs["drop_per_layer"])) <= 1
