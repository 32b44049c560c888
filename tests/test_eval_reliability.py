"""#16 items 8-15, 17, 24: the eval workflow gives no silent scores and names what is wrong.

Script-level checks run scripts/v1_5/eval/*.sh with a stand-in interpreter that logs its arguments
(no model); module-level checks call the eval modules in process on a tiny checkpoint."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_fitprune.eval import synthetic
from llava_fitprune.eval.io import EvalInputError
from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "v1_5" / "eval"
EVAL = "playground/data/eval"
SCRIPT_ENV = ("REDUCTION_RATIO", "RECIPE", "METHOD", "CKPT", "CHUNKS", "GPUS", "BATCH_SIZE", "CONV_MODE", "PYTHON",
              "EXTRA_ARGS")
# A stand-in for python: logs each call; an eval module exits with $FAKE_STATUS (0 by default).
FAKE_PYTHON = """#!/bin/bash
echo "$0 $*" >> "$FAKE_LOG"
case "$*" in *llava_fitprune.eval.model_vqa*) exit "${FAKE_STATUS:-0}" ;; esac
exit 0
"""


def fake_python(folder: Path) -> Path:
    path = folder / "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def run_script(script: Path, cwd: Path, log: Path, **settings) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    env.update(MODEL_PATH="ckpts/llava-tiny", FAKE_LOG=str(log), **settings)
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def logged(log: Path) -> str:
    return log.read_text() if log.exists() else ""


# --- item 12: runs are named by what ran; every method documented ---------------------------------

def test_scripts_name_runs_by_the_method_that_ran(tmp_path):
    from llava_fitprune.core.methods import FASTV_K, FASTV_R, METHODS

    python = fake_python(tmp_path / "bin")
    out = run_script(SCRIPTS / "textvqa.sh", tmp_path, tmp_path / "fastv.log", METHOD="fastv", PYTHON=str(python))
    assert out.returncode == 0, out.stderr
    assert f"answers/llava-tiny-fastv-k{FASTV_K}-r{FASTV_R:g}/1_0.jsonl" in logged(tmp_path / "fastv.log")
    assert "llava-tiny-dense" not in logged(tmp_path / "fastv.log")
    for method in ("uniform", "random"):  # no budget: refused before anything runs
        out = run_script(SCRIPTS / "textvqa.sh", tmp_path, tmp_path / f"{method}.log", METHOD=method,
                         PYTHON=str(python))
        assert out.returncode == 2 and "needs a budget: set REDUCTION_RATIO" in out.stderr
        assert logged(tmp_path / f"{method}.log") == ""
    out = run_script(SCRIPTS / "textvqa.sh", tmp_path, tmp_path / "bogus.log", METHOD="fitprun", PYTHON=str(python))
    assert out.returncode == 2 and "METHOD=fitprun is not a method" in out.stderr
    header = (SCRIPTS / "_common.sh").read_text().split("set -e")[0]
    for method in METHODS:
        assert f"#                      {method} " in header, f"_common.sh does not document METHOD={method}"


# --- item 15: "rerun to resume" only where rerunning helps -----------------------------------------

def test_failed_chunk_says_rerun_only_when_it_can_help(tmp_path):
    python = fake_python(tmp_path / "bin")
    bad = run_script(SCRIPTS / "gqa.sh", tmp_path, tmp_path / "bad.log", PYTHON=str(python), FAKE_STATUS="2")
    assert bad.returncode == 2
    assert "stopped on bad input: fix what its error names" in bad.stderr
    assert "rerun this script to resume" not in bad.stderr
    crash = run_script(SCRIPTS / "gqa.sh", tmp_path, tmp_path / "crash.log", PYTHON=str(python), FAKE_STATUS="137")
    assert crash.returncode == 1 and "rerun this script to resume" in crash.stderr
    assert "llava_fitprune.eval.merge" not in logged(tmp_path / "crash.log")


# --- item 24: the repository's .venv when PYTHON is unset ------------------------------------------

def test_scripts_use_the_repository_venv_when_python_is_unset(tmp_path):
    repo = tmp_path / "clone"
    (repo / "scripts/v1_5/eval").mkdir(parents=True)
    for name in ("_common.sh", "textvqa.sh"):
        shutil.copy(SCRIPTS / name, repo / "scripts/v1_5/eval" / name)
    venv_python = fake_python(repo / ".venv" / "bin")
    out = run_script(repo / "scripts/v1_5/eval/textvqa.sh", repo, tmp_path / "venv.log")
    assert out.returncode == 0, out.stderr
    calls = logged(tmp_path / "venv.log").splitlines()
    assert calls and all(c.startswith(f"{venv_python} ") for c in calls)
    assert any("llava_fitprune.eval.score textvqa" in c for c in calls)


# --- module-level checks on a tiny checkpoint ------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny"), TinyLlavaSpec(num_layers=2))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic.build(str(root), n=2, only=["gqa", "mmbench", "sqa"])
    return root


def loader_args(model, data, answers, question_file, *extra):
    return ["--model-path", model, "--question-file", str(question_file), "--answers-file", str(answers),
            "--image-folder", str(data / "gqa/data/images"), "--temperature", "0", "--max_new_tokens", "2",
            "--device", "cpu", *extra]


# item 10: zero answers are never a score; "complete" is tied to the question file's content

def test_edited_question_file_is_not_called_complete(model, data, tmp_path):
    from llava_fitprune.eval import model_vqa_loader

    questions = tmp_path / "q.jsonl"
    shutil.copy(data / "gqa/llava_gqa_testdev_balanced.jsonl", questions)
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(loader_args(model, data, answers, questions)) == 0
    meta = json.loads(Path(f"{answers}.meta.json").read_text())
    assert meta["complete"] and len(meta["question_file_sha256"]) == 64
    rows = [json.loads(x) for x in questions.read_text().splitlines()]
    rows[0]["text"] = "What shape is it?"  # edited in place: same name, same count
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalInputError, match=r"the question file .*q\.jsonl changed since"):
        model_vqa_loader.main(loader_args(model, data, answers, questions))


def test_empty_question_file_is_an_error_not_a_score(model, data, tmp_path):
    from llava_fitprune.eval import model_vqa_loader, runner
    from llava_fitprune.eval.score import score_textvqa
    from llava_fitprune.eval.score_gqa import score_gqa

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    answers = tmp_path / "a.jsonl"
    assert runner.cli(lambda: model_vqa_loader.main(loader_args(model, data, answers, empty))) == 2
    assert not answers.exists()
    with pytest.raises(EvalInputError, match="holds no questions"):
        model_vqa_loader.main(loader_args(model, data, answers, empty))
    annotations = tmp_path / "tv.json"
    annotations.write_text(json.dumps({"data": []}))
    with pytest.raises(EvalInputError, match="holds no answers"):
        score_textvqa(str(annotations), str(empty), str(tmp_path / "tv.score.json"))
    predictions = tmp_path / "p.json"
    predictions.write_text("[]")
    gqa_questions = data / "gqa/data/testdev_balanced_questions.json"
    with pytest.raises(EvalInputError, match="holds no answers"):
        score_gqa(str(gqa_questions), str(predictions), str(tmp_path / "g.score.json"))
    assert not (tmp_path / "tv.score.json").exists() and not (tmp_path / "g.score.json").exists()


def test_method_without_its_budget_fails_before_the_model_loads(data, tmp_path):
    from llava_fitprune.eval import model_vqa_loader

    questions = data / "gqa/llava_gqa_testdev_balanced.jsonl"
    common = ["--model-path", str(tmp_path / "no-such-llava"), "--question-file", str(questions),
              "--answers-file", str(tmp_path / "a.jsonl"), "--device", "cpu"]
    with pytest.raises(EvalInputError, match="--method uniform needs a budget: give --reduction-ratio or --recipe"):
        model_vqa_loader.main(common + ["--method", "uniform"])
    with pytest.raises(EvalInputError, match="--method 'fastvv': use fitprune, random, fastv or uniform"):
        model_vqa_loader.main(common + ["--method", "fastvv", "--reduction-ratio", "0.5"])
    assert not (tmp_path / "a.jsonl").exists()


# item 11: a question without its image is an error naming the file and row

def test_missing_images_are_errors_naming_file_and_row(data, tmp_path):
    from llava_fitprune.eval import model_vqa_loader, model_vqa_mmbench, model_vqa_science
    from llava_fitprune.eval.args import build_parser

    tsv = (data / "mmbench/mmbench_dev_20230712.tsv").read_text().splitlines()
    columns = tsv[0].split("\t")
    cells = tsv[2].split("\t")
    cells[columns.index("image")] = ""
    no_image = tmp_path / "mmb.tsv"
    no_image.write_text("\n".join([tsv[0], tsv[1], "\t".join(cells)]) + "\n")
    args = build_parser("t").parse_args(["--question-file", str(no_image)])
    with pytest.raises(EvalInputError, match=r"mmb\.tsv line 3 \(index 1001\) has no image cell"):
        model_vqa_mmbench.make_items(args)
    short = tmp_path / "short.tsv"  # the row ends before its image column
    short.write_text("\n".join([tsv[0], "\t".join(cells[: columns.index("image")])]) + "\n")
    with pytest.raises(EvalInputError, match=r"short\.tsv line 2 .* has no image cell"):
        model_vqa_mmbench.make_items(build_parser("t").parse_args(["--question-file", str(short)]))

    loader_questions = tmp_path / "q.jsonl"
    loader_questions.write_text(json.dumps({"question_id": 7, "image": None, "text": "What?"}) + "\n")
    with pytest.raises(EvalInputError, match=r"q\.jsonl entry 1 \(question 7\) has image None"):
        model_vqa_loader.make_items(build_parser("t").parse_args(["--question-file", str(loader_questions)]))
    sqa = json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text())
    sqa[0]["image"] = None
    sqa_file = tmp_path / "sqa.json"
    sqa_file.write_text(json.dumps(sqa))
    with pytest.raises(EvalInputError, match=r"sqa\.json entry 1 \(question 1\) has image None.*remove the"):
        model_vqa_science.make_items(build_parser("t").parse_args(["--question-file", str(sqa_file)]))


# item 13: an option whose text is "none" stays in the upload sheet

def test_mmbench_option_none_is_kept_in_the_upload(data, tmp_path):
    from llava_fitprune.eval.convert.convert_mmbench_for_submission import convert
    from llava_fitprune.eval.convert.xlsx import read_xlsx

    tsv = (data / "mmbench/mmbench_dev_20230712.tsv").read_text().splitlines()
    columns = tsv[0].split("\t")
    cells = tsv[1].split("\t")
    cells[columns.index("D")] = "none"
    annotation = tmp_path / "mmb.tsv"
    annotation.write_text("\n".join([tsv[0], "\t".join(cells)]) + "\n")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 1000, "text": "D"}) + "\n")
    convert(str(annotation), str(answers), str(tmp_path / "up.xlsx"))
    row = read_xlsx(tmp_path / "up.xlsx")[0]
    assert row["D"] == "none" and row["prediction"] == "D"


# item 8: ScienceQA (and MMBench) images as stock passes them: no RGB conversion unless stock crashes

def test_science_images_are_processed_as_stock_processes_them(model, data, tmp_path):
    from llava.mm_utils import process_images

    from llava_fitprune import load_pretrained_model
    from llava_fitprune.eval import model_vqa_science
    from llava_fitprune.eval.args import build_parser
    from llava_fitprune.eval.samples import EvalDataset

    images = tmp_path / "images"
    images.mkdir()
    rgb = Image.new("RGB", (32, 24), (200, 30, 30))
    rgb.quantize(colors=4).save(images / "palette.png")  # mode "P", not square: stock pads it as P
    rgb.convert("L").save(images / "gray.png")  # mode "L", not square: stock crashes padding it
    questions = [{"id": name, "image": f"{name}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}]}
                 for name in ("palette", "gray")]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    args = build_parser("t").parse_args(["--question-file", str(tmp_path / "q.json"), "--image-folder", str(images)])
    tokenizer, llava, processor, _ = load_pretrained_model(model, None, "llava-tiny", device="cpu")
    dataset = EvalDataset(model_vqa_science.make_items(args), tokenizer, processor, llava.config, "llava_v0")
    palette, gray = dataset[0], dataset[1]
    stock = process_images([Image.open(images / "palette.png")], processor, llava.config)[0]
    assert torch.equal(palette.image, stock) and not palette.converted_to_rgb
    converted = process_images([Image.open(images / "palette.png").convert("RGB")], processor, llava.config)[0]
    assert not torch.equal(stock, converted), "the palette image must tell the two paths apart"
    with pytest.raises(TypeError):
        process_images([Image.open(images / "gray.png")], processor, llava.config)
    assert gray.converted_to_rgb and gray.image.shape == stock.shape


# item 9: the vision tower's dtype as stock LLaVA's builder leaves it

def test_loader_dtypes_match_stock_llava(model):
    from llava.model.builder import load_pretrained_model as stock_load

    from llava_fitprune import load_pretrained_model

    _, ours, _, _ = load_pretrained_model(model, None, "llava-tiny", device="cpu", torch_dtype=torch.float16)
    cwd = os.getcwd()
    os.chdir(model)  # stock resolves the tiny checkpoint's relative tower path against the working directory
    try:
        _, stock, _, _ = stock_load(model, None, "llava-tiny", device="cpu")  # stock: float16 always
    finally:
        os.chdir(cwd)
    assert ours.dtype == stock.dtype == torch.float16
    assert ours.get_vision_tower().dtype == stock.get_vision_tower().dtype == torch.float32
    assert ours.get_model().mm_projector[0].weight.dtype == stock.get_model().mm_projector[0].weight.dtype


# --- item 14: the report has one row per distinct run, and a failed local score says so -------------

def merged_run(root: Path, rel: str, benchmark: str, score: float | None = None, **meta) -> Path:
    answers = root / rel
    answers.parent.mkdir(parents=True, exist_ok=True)
    answers.write_text(json.dumps({"question_id": 1, "text": "a"}) + "\n")
    order = len(list(root.rglob("*.meta.json")))  # later runs merge later
    meta = {"format": "llava-fitprune.eval-meta", "kind": "merged", "complete": True, "benchmark": benchmark,
            "model_name": "llava-tiny", "method": "fitprune", "reduction_ratio": None, "recipe": None,
            "conv_mode": "vicuna_v1", "batch_size": 1, "module": "model_vqa_loader", "max_new_tokens": 128,
            "num_answers": 1, "prefill": None, "merged_at": f"2026-01-01T00:00:{order:02d}",
            **meta}
    Path(f"{answers}.meta.json").write_text(json.dumps(meta))
    if score is not None:  # as the scorers write it: tied to the answers' sha256
        from llava_fitprune.eval.io import write_score

        write_score(f"{answers}.score.json", benchmark, "accuracy", score, str(answers))
    return answers


def report_rows(md: str) -> dict[str, dict]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(heads, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {(r["Run"], r["Settings"]): r for r in rows}


def test_report_has_one_row_per_distinct_run(tmp_path):
    from llava_fitprune.eval import report

    root = tmp_path / "eval"
    merged_run(root, "textvqa/answers/tiny-dense.jsonl", "textvqa", 50.0)
    merged_run(root, "scienceqa/answers/tiny-dense.jsonl", "sqa", 60.0, module="model_vqa_science",
               max_new_tokens=1024)  # the module's own default: the same run as TextVQA's 128
    merged_run(root, "textvqa/answers/tiny-dense-bs8.jsonl", "textvqa", 49.0, batch_size=8)
    merged_run(root, "textvqa/answers/tiny-dense-short.jsonl", "textvqa", 48.0, max_new_tokens=16)
    merged_run(root, "textvqa/answers/tiny-dense-plain.jsonl", "textvqa", 47.0, conv_mode="plain")
    fastv = {"drop_per_layer": [0, 300], "num_visual_tokens": 576, "reduction_ratio": None, "method": "fastv",
             "provenance": {"fastv_k": 2, "fastv_r": 0.52}}
    merged_run(root, "textvqa/answers/tiny-fastv-r0.6.jsonl", "textvqa", 40.0, method="fastv", reduction_ratio=0.6,
               recipe=fastv, recipe_fingerprint="abc123")
    merged_run(root, "textvqa/answers/tiny-fastv-k2-r0.5.jsonl", "textvqa", 41.0, method="fastv",
               recipe=dict(fastv, provenance={"fastv_k": 2, "fastv_r": 0.5}), recipe_fingerprint="def456")
    merged_run(root, "pope/answers/tiny-broken.jsonl", "pope")  # its local scorer failed: no score file
    merged_run(root, "mmbench/answers/mmbench_dev_20230712/tiny-broken.jsonl", "mmbench", module="model_vqa_mmbench",
               max_new_tokens=1024)  # scored by MMBench's server
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    rows = report_rows((tmp_path / "out" / "report.md").read_text())
    base = "vicuna_v1, batch 1"
    assert set(rows) == {("tiny-dense", base), ("tiny-dense-bs8", "vicuna_v1, batch 8"),
                         ("tiny-dense-short", f"{base}, max_new_tokens 16"), ("tiny-dense-plain", "plain, batch 1"),
                         ("tiny-fastv-r0.6", base), ("tiny-fastv-k2-r0.5", base), ("tiny-broken", base)}
    dense = rows[("tiny-dense", base)]
    assert (dense["TextVQA"], dense["SQA-IMG"], dense["Method"]) == ("50.0", "60.0", "dense")
    assert rows[("tiny-dense-bs8", "vicuna_v1, batch 8")]["TextVQA"] == "49.0"
    assert rows[("tiny-fastv-r0.6", base)]["Method"] == "fastv (0.6)"
    assert rows[("tiny-fastv-k2-r0.5", base)]["Method"] == "fastv (K=2 R=0.5)"
    broken = rows[("tiny-broken", base)]
    assert broken["POPE"] == report.LOCAL_SCORE_FAILED and broken["MMB"] == report.NO_LOCAL_SCORE


# --- item 17: eval writers never leave a partial file under the final name -------------------------

def test_eval_writers_replace_their_outputs_atomically(data, tmp_path, monkeypatch):
    from llava_fitprune.eval import merge, report
    from llava_fitprune.eval.convert import convert_seed_for_submission
    from llava_fitprune.eval.convert.xlsx import write_xlsx

    synthetic.build(str(tmp_path / "eval"), n=2, only=["seed"])
    seed_answers = tmp_path / "seed.jsonl"
    seed_answers.write_text("".join(json.dumps({"question_id": q, "text": "A"}) + "\n" for q in ("100", "101")))
    runs = tmp_path / "runs"
    merged_run(runs, "textvqa/answers/x.jsonl", "textvqa", 50.0)
    chunk = tmp_path / "chunk.jsonl"
    chunk.write_text(json.dumps({"question_id": 1, "text": "a"}) + "\n")

    def crash(src, dst):  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    writes = {
        tmp_path / "up.xlsx": lambda: write_xlsx(str(tmp_path / "up.xlsx"), ["a"], [["b"]]),
        tmp_path / "seed_up.jsonl": lambda: convert_seed_for_submission.convert(
            str(tmp_path / "eval/seed_bench/SEED-Bench.json"), str(seed_answers), str(tmp_path / "seed_up.jsonl"),
            str(tmp_path / "seed.score.json")),
        tmp_path / "merged.jsonl": lambda: merge.concatenate([str(chunk)], str(tmp_path / "merged.jsonl")),
        tmp_path / "report" / "report.md": lambda: report.main([str(runs), "--out", str(tmp_path / "report")]),
    }
    for path, write in writes.items():
        with pytest.raises(KeyboardInterrupt):
            write()
        assert not path.exists(), f"{path.name} exists although its write never finished"
        assert not Path(f"{path}.tmp").exists()


def test_unreadable_image_is_one_line_naming_file_and_fix(model, data, tmp_path, capsys):
    from llava_fitprune.eval import model_vqa_loader, runner

    images = tmp_path / "images"
    shutil.copytree(data / "gqa/data/images", images)
    (images / "n1.jpg").write_bytes(b"not an image")
    questions = data / "gqa/llava_gqa_testdev_balanced.jsonl"
    for workers in ("0", "1"):  # in process, and re-raised from a DataLoader worker (the GPU default)
        answers = tmp_path / f"a{workers}.jsonl"
        argv = loader_args(model, data, answers, questions, "--image-folder", str(images), "--num-workers", workers)
        assert runner.cli(lambda: model_vqa_loader.main(argv)) == runner.BAD_INPUT_STATUS
        stderr = capsys.readouterr().err
        errors = re.findall(r"error: [^\r\n]*", stderr)  # the rest is tqdm's progress bar
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        err = errors[0]
        assert f"image file {images / 'n1.jpg'} (question 20001) cannot be read" in err
        assert "replace the file (a readable image) or remove question 20001 from the question file" in err
