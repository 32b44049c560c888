"""The fast path's switches: load_pretrained_model(compile=True), the eval modules' --compile, COMPILE=1."""
import json
import subprocess
import sys

from .conftest import load_ours
from .test_eval import EVAL, REPO, model, read_jsonl, root  # noqa: F401 (model, root: fixtures)


def test_load_pretrained_model_compile_turns_the_fast_path_on(tiny_dir):
    _, fast_model, _, _ = load_ours(tiny_dir, compile=True)
    assert fast_model.fast_path.mode == "eager"  # CPU: the static-cache step, not compiled (BENCHMARKS.md)
    assert "generate" in fast_model.__dict__
    _, plain, _, _ = load_ours(tiny_dir)
    assert not hasattr(plain, "fast_path") and "generate" not in plain.__dict__


def _pope(model, root, **settings):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),  # this checkout's package, not the installed one
           "MODEL_PATH": model, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "RECIPE": str(root / "tiny-r0.5.json"), "BATCH_SIZE": "2", "EXTRA_ARGS": "--max_new_tokens 3", **settings}
    out = subprocess.run(["bash", str(REPO / "scripts/v1_5/eval/pope.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    return out


def test_compile_1_runs_the_eval_on_the_fast_path_with_the_same_answers(model, root):
    runs = {}
    for compile_flag in ("0", "1"):
        out = _pope(model, root, COMPILE=compile_flag, CKPT=f"tiny-compile{compile_flag}")
        assert out.returncode == 0, out.stderr[-3000:]
        answers = root / EVAL / "pope" / "answers" / f"tiny-compile{compile_flag}.jsonl"
        meta = json.loads((answers.parent / (answers.name + ".meta.json")).read_text())
        assert meta["compile"] is (compile_flag == "1") and meta["complete"] is True
        runs[compile_flag] = [(r["question_id"], r["text"], r["metadata"]["prefill"]) for r in read_jsonl(answers)]
    assert runs["1"] == runs["0"]
    bad = _pope(model, root, COMPILE="yes")
    assert bad.returncode == 2 and "COMPILE must be 0 or 1" in bad.stderr
