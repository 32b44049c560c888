"""Every subcommand meets bad input with one line naming the argument and the fix, exit status 2, no
traceback, and before any weights load (#16 items 18, 19, 25). One table, run in-process through
`llava_fitprune.cli.main`; one row again as a real process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from llava_fitprune.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CALIB = os.path.join(ROOT, "eval_data", "calibration", "tiny")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
NO_FLASH = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                              reason="flash-attn and CUDA are available here")
NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed installed")

# Placeholders: {model} a checkpoint folder holding only config.json (no weights: nothing may load),
# {q} / {img} the bundled calibration questions / images, {data} LLaVA instruction data, {file} a plain
# file, {bad_json} a file that is not JSON, {torn} a checkpoint folder cut short, {split} a synthetic split
# of one question, {out} a fresh folder.
FIT = "fit --model-path {model} --question-file {q} --image-folder {img} --reduction-ratio 0.5 --out {out} --device cpu"
FLOPS = "flops"
BENCH = "bench --model llava-v1.5-7b --width 256 --out-dir {out} --device cpu"
DEMO = "demo --model-path {model} --out {out} --device cpu"
ACCURACY = "accuracy --checkpoint {model} --out-dir {out}"
TRAIN = "lvprune-train --model-path {model} --data-path {data} --image-folder {img} --output-dir {out} --device cpu"

ROWS = [  # (command line, what the one-line message must contain)
    ("nosuch", "unknown subcommand 'nosuch'"),
    (FIT + " --model-path /nonexistent", "--model-path /nonexistent"),
    (FIT + " --model-path {file}", "--model-path"),
    (FIT + " --dtype garbage", "--dtype"),
    (FIT + " --conv-mode nosuch", "--conv-mode nosuch"),
    pytest.param(FIT + " --device cuda", "--device cuda", marks=NO_CUDA),
    (FIT + " --device gpu", "--device gpu"),
    (FIT + " --tol 0", "--tol 0"),
    (FIT + " --tol nan", "--tol nan"),
    (FIT + " --batch-size 0", "--batch-size 0"),
    (FIT + " --num-samples 0", "--num-samples 0"),
    (FIT + " --num-samples 13", "--num-samples 12 or fewer"),  # the bundled file has 12
    (FIT + " --question-file /nonexistent.jsonl", "--question-file"),
    (FIT + " --image-folder /nonexistent", "--image-folder"),
    (FIT + " --out /dev/null/x", "--out /dev/null/x"),
    (FIT + " --out {file}", "--out"),
    (FIT + " --reduction-ratio 60", "not 60"),
    (FIT.replace(" --out {out}", ""), "--out"),
    (FLOPS + " --visual-tokens 0", "--visual-tokens 0"),
    (FLOPS + " --visual-tokens -5", "--visual-tokens -5"),
    (FLOPS + " --prompt-tokens -1", "--prompt-tokens -1"),
    (FLOPS + " --config {bad_json}", "--config"),
    (FLOPS + " --config nosuch", "--config nosuch"),
    (FLOPS + " --config {data}", "--config"),  # JSON, but not a model config
    (FLOPS + " --visual-tokens x", "--visual-tokens"),
    (FLOPS + " --reduction-ratio 1.5", "1.5"),
    (BENCH + " --batch-size 0", "--batch-size 0"),
    (BENCH + " --batch-size", "--batch-size"),
    (BENCH + " --repeats 0", "--repeats 0"),
    (BENCH + " --warmup -1", "--warmup -1"),
    (BENCH + " --new-tokens 0", "--new-tokens 0"),
    (BENCH + " --visual-tokens 0", "--visual-tokens 0"),
    (BENCH + " --attn bogus", "--attn bogus"),
    pytest.param(BENCH + " --attn flash_attention_2", "--attn flash_attention_2", marks=NO_FLASH),
    pytest.param(BENCH + " --device cuda", "--device cuda", marks=NO_CUDA),
    (BENCH + " --dtype garbage", "--dtype"),
    (BENCH + " --threads -3", "--threads -3"),
    (BENCH + " --threads 0", "--threads 0"),
    (BENCH + " --model /nonexistent", "--model /nonexistent"),
    (BENCH + " --width 65", "--width 65"),
    (BENCH + " --out-dir /dev/null/x", "--out-dir /dev/null/x"),
    (BENCH + " --tag a/b", "--tag"),
    (BENCH + " --reduction-ratio 1.5", "1.5"),
    (BENCH + " --methods bogus", "--methods"),
    (DEMO + " --model-path /nonexistent", "--model-path /nonexistent"),
    (DEMO + " --dtype garbage", "--dtype"),
    (DEMO + " --conv-mode nosuch", "--conv-mode nosuch"),
    pytest.param(DEMO + " --device cuda", "--device cuda", marks=NO_CUDA),
    (DEMO + " --attn-implementation bogus", "--attn-implementation bogus"),
    (DEMO + " --repeats 0", "--repeats 0"),
    (DEMO + " --max-new-tokens 0", "--max-new-tokens 0"),
    (DEMO + " --num-questions 0", "--num-questions 0"),
    (DEMO + " --out /dev/null/x", "--out /dev/null/x"),
    (DEMO + " --reduction-ratio 60", "not 60"),
    (DEMO + " --method bogus", "--method"),
    (DEMO + " --synth-split /nonexistent", "--synth-split"),
    (ACCURACY + " --threads -3", "--threads -3"),
    (ACCURACY + " --conv-mode nosuch", "--conv-mode nosuch"),
    (ACCURACY + " --out-dir /dev/null/x", "--out-dir /dev/null/x"),
    (ACCURACY + " --checkpoint /nonexistent", "--checkpoint /nonexistent"),
    (ACCURACY + " --batch-size 0", "--batch-size 0"),
    (ACCURACY + " --limit 0", "--limit 0"),
    (ACCURACY + " --ratios 2", "--ratios"),
    (ACCURACY + " --methods bogus", "--methods"),
    (ACCURACY + " --split /nonexistent", "--split"),
    (TRAIN + " --model-path /nonexistent", "--model-path /nonexistent"),
    (TRAIN + " --model-base /nonexistent", "--model-base /nonexistent"),
    (TRAIN + " --data-path /nonexistent.json", "--data-path"),
    (TRAIN + " --data-path {bad_json}", "--data-path"),
    (TRAIN + " --data-path {model}/config.json", "--data-path"),  # JSON, but not instruction data
    (TRAIN + " --image-folder /nonexistent", "--image-folder"),
    (TRAIN + " --output-dir /dev/null/x", "--output-dir /dev/null/x"),
    (TRAIN + " --output-dir {file}", "--output-dir"),
    (TRAIN + " --dtype garbage", "--dtype"),
    pytest.param(TRAIN + " --device cuda", "--device cuda", marks=NO_CUDA),
    (TRAIN + " --attn bogus", "--attn"),
    (TRAIN + " --conv-template nosuch", "--conv-template nosuch"),
    (TRAIN + " --layers 0,9 --keep 0.5,0.2", "--layers 0,9"),  # the model has 4 layers
    (TRAIN + " --layers 2,1 --keep 0.5,0.2", "--layers 2,1"),
    (TRAIN + " --layers 1,2", "--layers"),
    (TRAIN + " --layers 1,x --keep 0.5,0.2", "--layers"),
    (TRAIN + " --layers 1,2 --keep 0.5,1.5", "--keep 1.5"),
    (TRAIN + " --layers 1,2 --keep 0.2,0.5", "--layers 1,2"),  # keep must not increase
    (TRAIN + " --batch-size 0", "--batch-size 0"),
    (TRAIN + " --max-steps 0", "--max-steps 0"),
    (TRAIN + " --epochs 0", "--epochs 0"),
    (TRAIN + " --grad-accum 0", "--grad-accum 0"),
    (TRAIN + " --lr 0", "--lr 0"),
    (TRAIN + " --lr nan", "--lr nan"),
    (TRAIN + " --weight-decay -1", "--weight-decay -1"),
    (TRAIN + " --warmup-ratio 2", "--warmup-ratio 2"),
    (TRAIN + " --max-grad-norm -1", "--max-grad-norm -1"),
    (TRAIN + " --ratio-weight -1", "--ratio-weight -1"),
    (TRAIN + " --init-keep 1", "--init-keep 1"),
    (TRAIN + " --temperature 0", "--temperature 0"),
    (TRAIN + " --width 10 --heads 3", "--width 10"),
    (TRAIN + " --heads 0", "--heads 0"),
    (TRAIN + " --log-steps 0", "--log-steps 0"),
    (TRAIN + " --save-steps 0", "--save-steps 0"),
    (TRAIN + " --num-workers -1", "--num-workers -1"),
    (TRAIN + " --model-max-length 0", "--model-max-length 0"),
    (TRAIN + " --resume /nonexistent", "--resume /nonexistent"),
    (TRAIN + " --resume {torn}", "--resume"),
    pytest.param(TRAIN + " --deepspeed z.json", "pip install deepspeed", marks=NO_DEEPSPEED),
    (TRAIN.replace(" --data-path {data}", ""), "--data-path"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "llava-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava_llama", "hidden_size": 64,
                                                   "num_hidden_layers": 4, "num_attention_heads": 4}))
    (root / "file").write_text("not a folder")
    (root / "bad.json").write_text("{not json")
    data = [{"id": "0", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                            {"from": "gpt", "value": "A"}]}]
    (root / "data.json").write_text(json.dumps(data))
    (root / "split").mkdir()
    (root / "split" / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "0.png", "text": "Q?"}))
    (root / "split" / "answers.jsonl").write_text(json.dumps({"question_id": 0, "answer": "A"}))
    torn = root / "run" / "checkpoint-4"
    torn.mkdir(parents=True)
    (torn / "lvprune_config.json").write_text("{")
    return {"model": str(model), "q": os.path.join(TINY_CALIB, "questions.jsonl"),
            "img": os.path.join(TINY_CALIB, "images"), "data": str(root / "data.json"), "file": str(root / "file"),
            "bad_json": str(root / "bad.json"), "torn": str(torn), "split": str(root / "split")}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any row that gets as far as loading weights or building a model fails the test."""
    def refuse(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    import llava_fitprune
    from llava_fitprune.cli import bench
    from llava_fitprune.adapters.llava import builder

    # the package's lazy export first: reading it caches the builder's function, which undo restores
    monkeypatch.setattr(llava_fitprune, "load_pretrained_model", refuse)
    monkeypatch.setattr(builder, "load_pretrained_model", refuse)
    monkeypatch.setattr(bench, "build_lm", refuse)


def run_in_process(argv, capsys) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("line, expected", ROWS)
def test_bad_input_is_one_line_naming_the_argument(line, expected, paths, nothing_loads, tmp_path, capsys):
    argv = line.format(**paths, out=str(tmp_path / "out")).split()
    code, out, err = run_in_process(argv, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize("line", [FIT, DEMO, TRAIN, ACCURACY + " --split {split}"])
def test_a_checkpoint_that_cannot_load_is_one_line(line, paths, tmp_path, capsys):
    """Past the checks, a folder without weights or tokenizer (or a hub id without network) fails at the load."""
    code, out, err = run_in_process(line.format(**paths, out=str(tmp_path / "out")).split(), capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, err
    assert f"{paths['model']}: cannot load it" in lines[0] and ("--model-path" in lines[0] or "--checkpoint" in lines[0])


def test_a_real_process_gets_the_same_line(tmp_path):
    """Exit status and stderr of the installed entry point, not just the in-process main."""
    r = subprocess.run([sys.executable, "-m", "llava_fitprune.cli", "bench", "--repeats", "0", "--out-dir",
                        str(tmp_path)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["llava-fitprune bench: error: --repeats 0: must be >= 1 "
                                             "(see llava-fitprune bench --help)"]


def test_fit_calibrates_on_every_question_unless_told(paths, monkeypatch, tmp_path, capsys):
    """#16 item 25: without --num-samples, fit uses all the file has (with a note) instead of asking for 66."""
    from llava_fitprune.cli import fit as fit_cli
    from llava_fitprune.adapters.llava import builder, calibration
    from llava_fitprune.core import fit as core_fit

    asked = []

    class Stop(Exception):
        pass

    def calibration_of(model, tok, proc, question_file, image_folder, *, num_samples, **kw):
        asked.append(num_samples)
        raise Stop  # what follows is the fit itself, tested in test_fit

    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: (None, None, None, None))
    monkeypatch.setattr(calibration, "build_calibration", calibration_of)
    monkeypatch.setattr(core_fit, "fit", lambda *a, **k: pytest.fail("fit ran"))
    argv = FIT.format(**paths, out=str(tmp_path / "out")).split()[1:]
    for extra, expected in (([], 12), (["--num-samples", "5"], 5)):
        with pytest.raises(Stop):
            fit_cli.main(argv + extra)
    assert asked == [12, 5]
    assert "calibrating on all 12 questions" in capsys.readouterr().out
