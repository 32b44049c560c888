"""LLaVA's eval workflow with pruning, end to end on CPU: scripts/v1_5/eval/*.sh on a tiny model and
synthetic benchmarks in LLaVA's layout, then chunking, resume, the report, converters, serving."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llava_fitprune.eval import synthetic
from llava_fitprune.eval.io import EvalInputError
from llava_fitprune.core.recipe import Recipe
from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "v1_5" / "eval"
BENCHMARKS = ["textvqa", "gqa", "vqav2", "pope", "mme", "mmbench", "mmbench_cn", "sqa", "seed", "vizwiz",
              "mmvet", "llavabench"]
EVAL = "playground/data/eval"
MAX_NEW_TOKENS = 3
PARALLEL_SCRIPTS = 2  # two cores, one torch thread per process
SCRIPT_TIMEOUT_S = 600
DENSE = "llava-tiny-dense"
# where each script leaves its merged answers (LLaVA's layout) and what its evaluator prints
MERGED = {
    "textvqa": f"textvqa/answers/{DENSE}.jsonl", "pope": f"pope/answers/{DENSE}.jsonl",
    "gqa": f"gqa/answers/llava_gqa_testdev_balanced/{DENSE}/merge.jsonl",
    "vqav2": f"vqav2/answers/llava_vqav2_mscoco_test-dev2015/{DENSE}/merge.jsonl",
    "mme": f"MME/answers/{DENSE}.jsonl", "mmbench": f"mmbench/answers/mmbench_dev_20230712/{DENSE}.jsonl",
    "mmbench_cn": f"mmbench_cn/answers/mmbench_dev_cn_20231003/{DENSE}.jsonl",
    "sqa": f"scienceqa/answers/{DENSE}.jsonl", "seed": f"seed_bench/answers/{DENSE}/merge.jsonl",
    "vizwiz": f"vizwiz/answers/{DENSE}.jsonl", "mmvet": f"mm-vet/answers/{DENSE}.jsonl",
    "llavabench": f"llava-bench-in-the-wild/answers/{DENSE}.jsonl",
}
PRINTS = {"textvqa": "Accuracy:", "gqa": "Accuracy:", "pope": "F1 score:", "mme": "total score:",
          "sqa": "IMG-Accuracy", "seed": "image accuracy:"}
UPLOADS = {"vqav2": f"vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015/{DENSE}.json",
           "vizwiz": f"vizwiz/answers_upload/{DENSE}.json", "seed": f"seed_bench/answers_upload/{DENSE}.jsonl",
           "mmbench": f"mmbench/answers_upload/mmbench_dev_20230712/{DENSE}.xlsx",
           "mmbench_cn": f"mmbench_cn/answers_upload/mmbench_dev_cn_20231003/{DENSE}.xlsx",
           "mmvet": f"mm-vet/results/{DENSE}.json"}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def texts(path) -> list[tuple]:
    return [(a["question_id"], a.get("round_id"), a["prompt"], a["text"]) for a in read_jsonl(path)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny"), TinyLlavaSpec(num_layers=2))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A working directory like LLaVA's repository root: playground/data/eval/<bench>/..."""
    root = tmp_path_factory.mktemp("repo")
    synthetic.build(str(root / EVAL))
    Recipe([288, 144], 576, reduction_ratio=0.5).save(root / "tiny-r0.5.json")
    return root


def run_script(name: str, root: Path, model: str, **settings) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDUCTION_RATIO", "RECIPE", "METHOD", "CKPT", "CHUNKS", "GPUS", "BATCH_SIZE", "CONV_MODE")}
    env.update(MODEL_PATH=model, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               EXTRA_ARGS=f"--max_new_tokens {MAX_NEW_TOKENS}", **settings)
    out = subprocess.run(["bash", str(SCRIPTS / f"{name}.sh")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=SCRIPT_TIMEOUT_S)
    assert out.returncode == 0, f"{name}.sh failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dense(root, model) -> dict:
    """Every script once, dense, one CPU chunk: {benchmark: its stdout}."""
    with ThreadPoolExecutor(PARALLEL_SCRIPTS) as pool:
        outs = dict(zip(BENCHMARKS, pool.map(lambda b: run_script(b, root, model), BENCHMARKS)))
    return {b: o.stdout for b, o in outs.items()}


def test_every_script_writes_answers_scores_and_uploads(dense, root):
    base = root / EVAL
    for bench in BENCHMARKS:
        answers = base / MERGED[bench]
        meta = json.load(open(f"{answers}.meta.json"))
        assert meta["complete"] and meta["kind"] == "merged" and meta["benchmark"] == bench
        assert meta["num_answers"] == len(read_jsonl(answers)) > 0
        assert meta["prefill"]["dense_tflops_mean"] > 0 and meta["recipe"] is None
        assert len(meta["prefill"]["seq_len_entering_mean"]) == meta["lm_shape"]["num_layers"] + 1
        for key in ("model_path", "attn_implementation", "batch_size", "wall_time_s", "method", "reduction_ratio"):
            assert key in meta
    for bench, line in PRINTS.items():
        assert line in dense[bench], f"{bench}: no score printed"
        assert json.load(open(base / f"{MERGED[bench]}.score.json"))["score"] is not None
    for bench, upload in UPLOADS.items():
        assert (base / upload).is_file(), f"{bench}: no upload file {upload}"
    vqav2 = json.load(open(base / UPLOADS["vqav2"]))
    assert [a["question_id"] for a in vqav2] == [0, 1, 2, 3, 4] and vqav2[-1]["answer"] == ""


def interrupt(answers: Path) -> None:
    """What a kill leaves behind: the chunk's third answer half written, no merge, `complete: false`."""
    chunk = answers.parent / answers.stem / "1_0.jsonl"
    lines = open(chunk).read().splitlines(keepends=True)
    chunk.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    meta = json.load(open(f"{chunk}.meta.json"))
    json.dump(dict(meta, complete=False), open(f"{chunk}.meta.json", "w"))
    os.remove(f"{answers}.meta.json")
    os.remove(answers)


@pytest.fixture(scope="module")
def variants(dense, root, model) -> dict:
    """Three more runs side by side: GQA in two chunks, POPE resumed after a kill, TextVQA pruned in batches."""
    pope = root / EVAL / MERGED["pope"]
    before = texts(pope)
    interrupt(pope)
    jobs = {"chunks": ("gqa", {"CHUNKS": "2", "CKPT": "two-chunks"}), "resume": ("pope", {}),
            "pruned": ("textvqa", {"RECIPE": str(root / "tiny-r0.5.json"), "BATCH_SIZE": "2"})}
    with ThreadPoolExecutor(PARALLEL_SCRIPTS) as pool:
        futures = {k: pool.submit(run_script, bench, root, model, **env) for k, (bench, env) in jobs.items()}
        outs = {k: f.result().stdout for k, f in futures.items()}
    return {**outs, "pope_before": before}


def test_two_chunks_merge_to_the_single_chunk_answers(variants, root):
    folder = root / EVAL / "gqa/answers/llava_gqa_testdev_balanced"
    assert sorted(p.name for p in (folder / "two-chunks").glob("2_*.jsonl")) == ["2_0.jsonl", "2_1.jsonl"]
    assert texts(folder / "two-chunks/merge.jsonl") == texts(root / EVAL / MERGED["gqa"])


def test_interrupted_run_resumes_without_duplicates_or_losses(variants, root):
    assert "[resume]" in variants["resume"] and "2 of 6 answers already written" in variants["resume"]
    assert texts(root / EVAL / MERGED["pope"]) == variants["pope_before"]
    chunk = root / EVAL / "pope/answers" / DENSE / "1_0.jsonl"
    assert json.load(open(f"{chunk}.meta.json"))["sessions"] == 2


def test_pruned_batched_run_records_its_recipe_and_flops(variants, root):
    answers = root / EVAL / "textvqa/answers/llava-tiny-fitprune-tiny-r0.5.jsonl"
    meta = json.load(open(f"{answers}.meta.json"))
    assert meta["complete"] and meta["pruning"] and meta["batch_size"] == 2 and meta["method"] == "fitprune"
    assert meta["recipe"]["drop_per_layer"] == [288, 144]
    p = meta["prefill"]
    assert p["measured_fraction"] == 1.0  # read from the model's prefill trace
    assert p["visual_tokens_entering_mean"] == [576, 288, 144]
    assert 0 < p["pruned_tflops_mean"] < p["dense_tflops_mean"] and p["reduction"] > 0
    assert "Accuracy:" in variants["pruned"]


def test_merge_refuses_an_incomplete_chunk(root, capsys):
    from llava_fitprune.eval import merge

    chunk = root / EVAL / "pope/answers" / DENSE / "1_0.jsonl"
    partial = root / "partial.jsonl"
    partial.write_text(open(chunk).readline())
    meta = json.load(open(f"{chunk}.meta.json")) if chunk.exists() else {"format": "llava-fitprune.eval-meta"}
    meta.update(complete=False, num_answers=1, num_questions=6)
    json.dump(meta, open(f"{partial}.meta.json", "w"))
    assert merge.main(["--out", str(root / "merged.jsonl"), str(partial)]) == 1
    assert "is incomplete (1 of 6 answers)" in capsys.readouterr().err
    assert not (root / "merged.jsonl").exists()


def test_report_tables_every_run(variants, root, tmp_path):
    from llava_fitprune.eval import report

    assert report.main([str(root / EVAL), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    dense_row = next(line for line in md.splitlines() if line.startswith(f"| {DENSE} | llava-tiny | dense |"))
    cells = [c.strip() for c in dense_row.strip("|").split("|")]
    assert all(cells[: 7 + len(report.BENCHMARKS)]), f"a benchmark is missing from the dense row: {dense_row}"
    assert cells[7 + [b for b, _ in report.BENCHMARKS].index("pope")] == json.load(
        open(root / EVAL / f"{MERGED['pope']}.score.json"))["score"].__format__(".1f")
    rows = list(__import__("csv").DictReader(open(tmp_path / "report.csv")))
    merged = [r for r in rows if r["method"] == "dense"]
    assert {r["benchmark"] for r in merged} == set(BENCHMARKS)
    assert "| llava-tiny-fitprune-tiny-r0.5 | llava-tiny | fitprune (0.5) |" in md  # the pruned TextVQA run
    assert any(r["method"] == "fitprune" and r["benchmark"] == "textvqa" for r in rows)
    assert (tmp_path / "report.png").stat().st_size > 0


def test_bad_inputs_fail_before_the_model_loads(dense, root, model, tmp_path):
    from llava_fitprune.eval import model_vqa_loader

    questions = root / EVAL / "gqa/llava_gqa_testdev_balanced.jsonl"
    common = ["--model-path", model, "--answers-file", str(tmp_path / "a.jsonl"), "--device", "cpu"]
    with pytest.raises(EvalInputError, match=r"image file\(s\) do not exist .*n0\.jpg"):
        model_vqa_loader.main(common + ["--question-file", str(questions), "--image-folder", str(tmp_path)])
    with pytest.raises(EvalInputError, match="question file .*nope.jsonl does not exist"):
        model_vqa_loader.main(common + ["--question-file", str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(questions).readline() + "{not json\n")
    with pytest.raises(EvalInputError, match="bad.jsonl line 2 is not valid JSON"):
        model_vqa_loader.main(common + ["--question-file", str(bad)])
    assert not (tmp_path / "a.jsonl").exists()
    chunk = root / EVAL / "gqa/answers/llava_gqa_testdev_balanced" / DENSE / "1_0.jsonl"
    with pytest.raises(EvalInputError, match=r"other settings \(max_new_tokens: 3 -> 9"):
        model_vqa_loader.main(["--model-path", model, "--question-file", str(questions), "--answers-file", str(chunk),
                               "--image-folder", str(questions.parent / "data/images"), "--temperature", "0",
                               "--conv-mode", "vicuna_v1", "--max_new_tokens", "9", "--device", "cpu"])


def write_answers(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_converters_write_the_expected_formats(root, tmp_path):
    from llava_fitprune.eval.convert import (convert_gqa_for_eval, convert_mme, convert_mmvet_for_eval,
                                             convert_seed_for_submission, convert_vizwiz_for_submission,
                                             mme_calculation)

    answers = write_answers(tmp_path / "a.jsonl", [{"question_id": "7", "text": "Yes."},
                                                   {"question_id": 8, "text": "Two"}])
    assert convert_gqa_for_eval.convert(answers, tmp_path / "g.json") == [
        {"questionId": "7", "prediction": "yes"}, {"questionId": 8, "prediction": "two"}]
    convert_mmvet_for_eval.convert(answers, tmp_path / "m.json")
    assert json.load(open(tmp_path / "m.json")) == {"v1_7": "Yes.", "v1_8": "Two"}

    seed = root / EVAL / "seed_bench"  # truth A, B, C, D; the last question is a video
    seed_answers = write_answers(tmp_path / "s.jsonl", [{"question_id": q, "text": t} for q, t in
                                                        zip(["100", "101", "102", "103"], "ACCD")])
    score = convert_seed_for_submission.convert(seed / "SEED-Bench.json", seed_answers, tmp_path / "up.jsonl", None)
    assert score["score"] == pytest.approx(200 / 3) and score["details"]["video_accuracy"] == 100
    assert [json.loads(x)["prediction"] for x in open(tmp_path / "up.jsonl")] == list("ACCD")

    mme = root / EVAL / "MME"  # each image: a yes question then a no question; answering yes to all
    write_answers(mme / "answers" / "all-yes.jsonl", [{"question_id": q["question_id"], "prompt": q["text"],
                                                       "text": "Yes"} for q in read_jsonl(mme / "llava_mme.jsonl")])
    out = convert_mme.convert(str(mme), "all-yes")
    lines = open(Path(out["results_dir"]) / "existence.txt").read().splitlines()
    assert lines[0] == "0.txt\tIs the image red? Please answer yes or no.\tYes\tYes"
    scores = mme_calculation.calculate(out["results_dir"])["Perception"]
    assert scores["tasks"]["existence"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "questions": 4, "images": 2}
    assert scores["total"] == 100.0 and "count" in scores["missing"]

    vizwiz = root / EVAL / "vizwiz" / "llava_test.jsonl"
    partial = write_answers(tmp_path / "v.jsonl", [{"question_id": 0, "text": "Two."}])
    with pytest.raises(EvalInputError, match="no answer for 3 question"):
        convert_vizwiz_for_submission.convert(vizwiz, partial, tmp_path / "v.json")


def test_mmbench_upload_sheet(dense, root):
    from llava_fitprune.eval.convert.xlsx import ILLEGAL_XML, read_xlsx

    for folder, split in (("mmbench", "mmbench_dev_20230712"), ("mmbench_cn", "mmbench_dev_cn_20231003")):
        rows = read_xlsx(root / EVAL / UPLOADS[folder])
        assert list(rows[0]) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
        answers = {a["question_id"]: ILLEGAL_XML.sub("", a["text"]) for a in read_jsonl(root / EVAL / MERGED[folder])}
        assert {r["index"]: r["prediction"] or "" for r in rows} == answers
        assert rows[1]["D"] is None  # the three-option question


def test_local_scores_match_llavas_evaluators(dense, root, tmp_path, capsys):
    import contextlib
    import io

    from llava.eval.eval_pope import eval_pope
    from llava.eval.eval_textvqa import eval_single
    from llava_fitprune.eval.score import score_textvqa

    pope = root / EVAL / "pope"
    ours = json.load(open(pope / "answers" / f"{DENSE}.jsonl.score.json"))["details"]["categories"]
    category = {q["question_id"]: q["category"] for q in read_jsonl(pope / "llava_pope_test.jsonl")}
    for cat, metrics in ours.items():
        answers = [a for a in read_jsonl(pope / "answers" / f"{DENSE}.jsonl") if category[a["question_id"]] == cat]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            eval_pope(answers, pope / "coco" / f"coco_pope_{cat}.json")
        f1 = float(next(x for x in printed.getvalue().splitlines() if x.startswith("F1 score:")).split(":")[1])
        assert metrics["f1"] == pytest.approx(f1)

    tv = root / EVAL / "textvqa"
    guesses = ["red", "sign", "x", "yellow"]  # right, a minority answer, wrong, right
    rows = [dict(a, text=t) for a, t in zip(read_jsonl(tv / "answers" / f"{DENSE}.jsonl"), guesses)]
    answers = write_answers(tmp_path / "tv.jsonl", rows)
    ours = score_textvqa(str(tv / "TextVQA_0.5.1_val.json"), str(answers), str(tmp_path / "tv.score.json"))["score"]
    capsys.readouterr()
    eval_single(str(tv / "TextVQA_0.5.1_val.json"), str(answers))
    assert f"Accuracy: {ours:.2f}%" in capsys.readouterr().out and ours > 0


def test_serve_cli_chats_with_a_pruned_model(model, root, monkeypatch, capsys):
    from llava_fitprune.serve import cli

    turns = iter(["What colour is it?", "And now?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    image = root / EVAL / "gqa/data/images/n0.jpg"
    assert cli.main(["--model-path", model, "--image-file", str(image), "--device", "cpu", "--temperature", "0",
                     "--recipe", str(root / "tiny-r0.5.json"), "--max-new-tokens", "3", "--show-flops"]) == 0
    out = capsys.readouterr().out
    assert out.count("[prefill: visual tokens per layer 576 -> 144") == 2 and "exit..." in out


STUBS = {  # LLaVA's worker imports fastapi and uvicorn at module level; the worker test does not serve
    "fastapi/__init__.py": "class FastAPI:\n    def post(self, path):\n        return lambda fn: fn\n"
                           "class Request: pass\nclass BackgroundTasks: pass\n",
    "fastapi/responses.py": "class StreamingResponse: pass\n",
    "uvicorn.py": "def run(*args, **kwargs): pass\n",
}
WORKER = """
import base64, json, sys
from llava_fitprune.serve.model_worker import PrunedModelWorker
model, recipe, image, out = sys.argv[1:]
w = PrunedModelWorker("http://c", "http://w", "t", True, model, None, None, False, False, "cpu", recipe=recipe)
params = {"prompt": "USER: <image>\\nWhat colour? ASSISTANT:", "temperature": 0, "max_new_tokens": 3, "stop": "</s>",
          "images": [base64.b64encode(open(image, "rb").read()).decode()]}
chunks = [json.loads(c.rstrip(b"\\0")) for c in w.generate_stream(params)]
json.dump({"chunks": chunks, "drops": w.model.recipe.drop_per_layer}, open(out, "w"))
"""


def test_model_worker_serves_a_pruned_model(model, root, tmp_path):
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        for name, text in STUBS.items():
            (tmp_path / "stubs" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "stubs" / name).write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "stubs"), os.environ.get("PYTHONPATH", "")]))
    image = root / EVAL / "gqa/data/images/n0.jpg"
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", WORKER, model, str(root / "tiny-r0.5.json"), str(image), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    assert result["drops"] == [288, 144]
    assert result["chunks"] and all(c["error_code"] == 0 for c in result["chunks"])
    assert result["chunks"][-1]["text"].startswith("USER: <image>")
