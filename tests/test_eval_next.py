"""scripts/v1_6/eval: LLaVA-NeXT defaults over the shared workflow, on a tiny anyres Mistral checkpoint."""
import json
import subprocess
import sys

import pytest

from llava_fitprune.eval import synthetic
from llava_fitprune.core.recipe import Recipe
from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava
from .test_eval import EVAL, REPO, read_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny-next-mistral"),
                             TinyLlavaSpec(num_layers=2, image_size=112, anyres=True, backbone="mistral",
                                           num_kv_heads=2))
    root = tmp_path_factory.mktemp("repo")
    synthetic.build(str(root / EVAL))
    Recipe([100, 60], num_visual_tokens=300, reduction_ratio=0.5).save(root / "next.json")
    return model, root


def test_v1_6_pope_runs_pruned_with_the_mistral_template(setup):
    model, root = setup
    env = {"PATH": "/usr/bin:/bin", "MODEL_PATH": model, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO),  # this checkout's package, whatever the interpreter has installed
           "RECIPE": str(root / "next.json"), "BATCH_SIZE": "2", "EXTRA_ARGS": "--max_new_tokens 3"}
    out = subprocess.run(["bash", str(REPO / "scripts/v1_6/eval/pope.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "F1 score:" in out.stdout
    answers = list((root / EVAL / "pope" / "answers").glob("*.jsonl"))
    assert len(answers) == 1
    rows = read_jsonl(answers[0])
    counts = {r["metadata"]["prefill"]["visual_tokens"] for r in rows}
    assert min(counts) > (112 // 14) ** 2, "anyres adds tiles and newline tokens beyond the base image"
    for r in rows:  # each sample pruned by the recipe scaled to its own count
        p = r["metadata"]["prefill"]
        assert p["visual_entering"] == Recipe([100, 60], 300).visual_tokens_entering(p["visual_tokens"])
    meta = json.loads((answers[0].parent / (answers[0].name + ".meta.json")).read_text())
    assert meta["conv_mode"] == "mistral_instruct" and meta["complete"] is True
