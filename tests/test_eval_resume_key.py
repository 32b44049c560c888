"""#24 item 2 and the eval stumbles: a resumed (or "complete") answers file is only ever continued with
the settings that wrote it; settings that cannot change an answer (batch size, --compile) are reused
and the run says why; --limit through the scripts merges a partial run instead of failing.

Module-level checks call the eval modules in process on the tiny checkpoint; one check runs
scripts/v1_5/eval/textvqa.sh for real (two chunk processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_fitprune.core.recipe import Recipe
from llava_fitprune.eval import synthetic
from llava_fitprune.eval.io import EvalInputError

REPO = Path(__file__).resolve().parents[1]
EVAL = "playground/data/eval"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic.build(str(root), n=2, only=["gqa"])
    return root


def argv(model, data, answers, *extra) -> list[str]:
    return ["--model-path", model, "--question-file", str(data / "gqa/llava_gqa_testdev_balanced.jsonl"),
            "--answers-file", str(answers), "--image-folder", str(data / "gqa/data/images"), "--temperature", "0",
            "--max_new_tokens", "2", "--device", "cpu", *extra]


def answers_of(path) -> list[tuple]:
    return [(r["question_id"], r["text"]) for r in map(json.loads, Path(path).read_text().splitlines())]


def run(*args) -> int:
    from llava_fitprune.eval import model_vqa_loader

    return model_vqa_loader.main(list(args))


@pytest.fixture(scope="module")
def finished(tiny_dir, data, tmp_path_factory) -> Path:
    """A complete answers file of the default settings (a recipe file given, to vary it below)."""
    folder = tmp_path_factory.mktemp("finished")
    Recipe([288, 144, 0, 0], 576, reduction_ratio=0.5).save(folder / "r.json")
    answers = folder / "a.jsonl"
    assert run(*argv(tiny_dir, data, answers, "--recipe", str(folder / "r.json"))) == 0
    assert json.loads(Path(f"{answers}.meta.json").read_text())["complete"]
    return answers


def changed_copy(finished: Path, tmp_path: Path) -> Path:
    """The finished file and its sidecar, copied, so each case starts from the same complete run."""
    copy = tmp_path / "a.jsonl"
    shutil.copy(finished, copy)
    shutil.copy(f"{finished}.meta.json", f"{copy}.meta.json")
    return copy


# (what differs, the flags that change it, the sidecar key the refusal names)
CHANGES = [
    ("image folder", lambda d, f: ["--image-folder", str(f / "images2")], "image_folder"),
    ("conversation template", lambda d, f: ["--conv-mode", "vicuna_v1"], "conv_mode"),
    ("temperature", lambda d, f: ["--temperature", "0.7"], "temperature"),
    ("top_p", lambda d, f: ["--top_p", "0.5"], "top_p"),
    ("beams", lambda d, f: ["--num_beams", "2"], "num_beams"),
    ("max new tokens", lambda d, f: ["--max_new_tokens", "3"], "max_new_tokens"),
    ("model", lambda d, f: ["--model-path", str(f / "llava-copy")], "model_path"),
    ("method", lambda d, f: ["--method", "random"], "method"),
    ("recipe file", lambda d, f: ["--recipe", str(f / "other.json")], "recipe_file"),
    ("recipe edited in place", lambda d, f: ["--recipe", str(f / "r.json")], "recipe_file_sha256"),
    ("budget", lambda d, f: ["--reduction-ratio", "0.5"], "reduction_ratio"),
    ("dtype", lambda d, f: ["--dtype", "bfloat16"], "dtype"),
    ("attention", lambda d, f: ["--attn-implementation", "eager"], "attn_implementation"),
]


@pytest.mark.parametrize("what,flags,key", CHANGES, ids=[c[0] for c in CHANGES])
def test_every_answer_changing_setting_is_in_the_resume_key(what, flags, key, finished, tiny_dir, data, tmp_path,
                                                             capsys):
    from llava_fitprune.eval import runner

    answers = changed_copy(finished, tmp_path)
    if key == "image_folder":
        shutil.copytree(data / "gqa/data/images", tmp_path / "images2")
    if key == "model_path":
        shutil.copytree(tiny_dir, tmp_path / "llava-copy")
    Recipe([100, 0, 0, 0], 576).save(tmp_path / "other.json")
    Recipe([288, 144, 0, 0], 576, reduction_ratio=0.5).save(tmp_path / "r.json")
    if key == "recipe_file_sha256":  # the same path, other content
        Path(f"{answers}.meta.json").write_text(Path(f"{answers}.meta.json").read_text().replace(
            json.dumps(str(finished.parent / "r.json")), json.dumps(str(tmp_path / "r.json"))))
        Recipe([300, 144, 0, 0], 576).save(tmp_path / "r.json")
    before = answers.read_text()
    base = argv(tiny_dir, data, answers, "--recipe", str(finished.parent / "r.json"))
    if key in ("recipe_file", "recipe_file_sha256", "reduction_ratio"):  # the flag replaces the recipe
        base = argv(tiny_dir, data, answers)
    status = runner.cli(lambda: run(*base, *flags(data, tmp_path)))
    err = capsys.readouterr().err
    assert status == runner.BAD_INPUT_STATUS, f"{what}: a file written with other settings was {err or 'reused'}"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"({key}: " in lines[0], lines[0]
    assert "continuing would mix answers of two runs" in lines[0] and "rerun with the earlier settings" in lines[0]
    assert answers.read_text() == before


def test_a_partial_file_is_not_continued_with_another_image_folder(tiny_dir, data, tmp_path):
    answers = tmp_path / "a.jsonl"
    assert run(*argv(tiny_dir, data, answers, "--limit", "1")) == 0
    shutil.copytree(data / "gqa/data/images", tmp_path / "images2")
    with pytest.raises(EvalInputError, match=r"image_folder: '.*images' -> '.*images2'"):
        run(*argv(tiny_dir, data, answers, "--image-folder", str(tmp_path / "images2")))
    meta = json.loads(Path(f"{answers}.meta.json").read_text())
    assert len(answers_of(answers)) == meta["num_answers"] == 1 and not meta["complete"]


def test_default_attention_after_an_explicit_one_is_told_once_the_model_loads(tiny_dir, data, tmp_path, capsys):
    """Before loading, a default cannot be compared with an explicit choice: the loaded model tells."""
    eager, sdpa = tmp_path / "eager.jsonl", tmp_path / "sdpa.jsonl"
    assert run(*argv(tiny_dir, data, eager, "--attn-implementation", "eager")) == 0
    assert run(*argv(tiny_dir, data, sdpa, "--attn-implementation", "sdpa")) == 0
    capsys.readouterr()
    with pytest.raises(EvalInputError, match="attn_implementation: 'eager' -> 'sdpa'"):
        run(*argv(tiny_dir, data, eager))  # the default is sdpa here
    assert run(*argv(tiny_dir, data, sdpa)) == 0
    assert f"{sdpa} is complete (2 answers); nothing to do" in capsys.readouterr().out


def test_batch_size_or_compile_reuses_the_answers_and_says_why(finished, tiny_dir, data, tmp_path, capsys):
    from llava_fitprune.eval.answers import NEUTRAL_WHY

    answers = changed_copy(finished, tmp_path)
    before = answers.read_text()
    recipe = ["--recipe", str(finished.parent / "r.json")]
    capsys.readouterr()
    assert run(*argv(tiny_dir, data, answers, *recipe, "--batch-size", "2", "--compile")) == 0
    out = capsys.readouterr().out
    assert f"{answers} is complete (2 answers); nothing to do; reusing its answers although batch_size 1 -> 2, " \
           f"compile False -> True: {NEUTRAL_WHY}" in out
    assert answers.read_text() == before
    # what the note claims, here: a fresh batched, compiled run gives the same answers
    fresh = tmp_path / "fresh.jsonl"
    assert run(*argv(tiny_dir, data, fresh, *recipe, "--batch-size", "2", "--compile")) == 0
    assert answers_of(fresh) == answers_of(answers)
    partial = tmp_path / "partial.jsonl"  # a resumed file says it too
    assert run(*argv(tiny_dir, data, partial, *recipe, "--limit", "1")) == 0
    capsys.readouterr()
    assert run(*argv(tiny_dir, data, partial, *recipe, "--batch-size", "2")) == 0
    assert f"1 of 2 answers already written; reusing its answers although batch_size 1 -> 2: {NEUTRAL_WHY}" in \
        capsys.readouterr().out
    assert answers_of(partial) == answers_of(answers)


def test_compile_on_the_cpu_says_that_nothing_is_compiled(tiny_dir, data, tmp_path, capsys):
    assert run(*argv(tiny_dir, data, tmp_path / "a.jsonl", "--compile")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--compile")]
    assert lines == ["--compile on cpu: nothing is compiled here (prefill eager, decode eager: the fast path compiles "
                     "on CUDA only, see fast_path.py); the answers are the same, and its static KV cache is used"]


def test_limit_through_extra_args_merges_a_partial_run(tiny_dir, tmp_path, monkeypatch):
    """CHUNKS=2, EXTRA_ARGS="--limit 1": each chunk answers one question, the merge takes them marked
    partial, nothing is scored, exit 0; the chunks then finish and merge whole."""
    from llava_fitprune.eval import merge, model_vqa_loader

    synthetic.build(str(tmp_path / EVAL), n=4, only=["textvqa"])  # 4 questions, 2 a chunk
    env = {k: v for k, v in os.environ.items() if k not in ("REDUCTION_RATIO", "RECIPE", "METHOD", "CKPT", "GPUS",
                                                            "BATCH_SIZE", "CONV_MODE", "COMPILE")}
    env.update(MODEL_PATH=tiny_dir, PYTHON=sys.executable, OMP_NUM_THREADS="1", CHUNKS="2",
               EXTRA_ARGS="--limit 1 --max_new_tokens 2")
    out = subprocess.run(["bash", str(REPO / "scripts/v1_5/eval/textvqa.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    d = tmp_path / EVAL / "textvqa/answers"
    merged = d / "llava-tiny-dense.jsonl"
    meta = json.loads(Path(f"{merged}.meta.json").read_text())
    assert meta["partial"] and not meta["complete"] and meta["num_answers"] == len(answers_of(merged)) == 2
    assert meta["num_questions"] == 4 and "stopped_at_limit" not in meta
    assert "marked partial), not scored: rerun to answer more" in out.stderr
    assert "Accuracy" not in out.stdout and not Path(f"{merged}.score.json").exists()
    chunks = [str(d / "llava-tiny-dense" / f"2_{i}.jsonl") for i in range(2)]
    assert merge.main(["--out", str(merged), *chunks]) == 1  # without --partial: refused, as before
    monkeypatch.chdir(tmp_path)  # the script's relative paths
    textvqa = f"./{EVAL}/textvqa"
    for i, chunk in enumerate(chunks):  # what the script's rerun without --limit does per chunk
        assert model_vqa_loader.main(["--model-path", tiny_dir, "--question-file",
                                      f"{textvqa}/llava_textvqa_val_v051_ocr.jsonl", "--image-folder",
                                      f"{textvqa}/train_images", "--answers-file", chunk,
                                      "--num-chunks", "2", "--chunk-idx", str(i), "--conv-mode", "vicuna_v1",
                                      "--temperature", "0", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    assert merge.main(["--partial", "--out", str(merged), *chunks]) == 0
    meta = json.loads(Path(f"{merged}.meta.json").read_text())
    assert meta["complete"] and "partial" not in meta and meta["num_answers"] == 4


def test_device_type_is_in_the_key_and_version_1_sidecars_still_resume(finished, tiny_dir, data, tmp_path, capsys):
    """A sidecar from a CUDA run is not continued on the CPU; one written before this key existed
    (version 1: no device_type, recipe sha256 or requested attention) is told from the loaded model."""
    answers = changed_copy(finished, tmp_path)
    recipe = ["--recipe", str(finished.parent / "r.json")]
    sidecar = Path(f"{answers}.meta.json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, device_type="cuda", device="cuda:0")))
    with pytest.raises(EvalInputError, match=r"\(device_type: 'cuda' -> 'cpu'\)"):
        run(*argv(tiny_dir, data, answers, *recipe))
    old = {k: v for k, v in meta.items() if k not in ("device_type", "recipe_file_sha256",
                                                      "attn_implementation_requested")}
    sidecar.write_text(json.dumps(dict(old, version=1)))
    capsys.readouterr()
    assert run(*argv(tiny_dir, data, answers, *recipe)) == 0
    assert f"{answers} is complete (2 answers); nothing to do" in capsys.readouterr().out
    assert json.loads(sidecar.read_text())["version"] == 2
    sidecar.write_text(json.dumps(dict(old, version=1, device="cuda:0")))
    with pytest.raises(EvalInputError, match=r"device_type: 'cuda' -> 'cpu'"):
        run(*argv(tiny_dir, data, answers, *recipe))
