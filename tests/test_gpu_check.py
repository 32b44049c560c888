"""scripts/gpu_check.sh, up to the point that needs CUDA: every step at a tiny shape on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_every_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAILED" not in out.stderr, out.stderr[-3000:]
    assert "test_fast_path_cuda_bf16_same_tokens" in (tmp_path / "test_cuda.txt").read_text()
    fast = ("dense-fast", "fitprune-fast", "oracle-fast")
    for tag, methods in (("b1-fast", ("stock", "dense", "fitprune", "oracle") + fast),  # the GPU run: batch 1
                         ("b2", ("stock", "dense", "fitprune", "oracle"))):  # and 8, eager path only
        table = (tmp_path / f"cpu-smoke-fp32-sdpa-{tag}.md").read_text()
        for method in methods:
            assert f"| {method} |" in table, (tag, method)
        if tag == "b2":
            assert not any(f"| {m} |" in table for m in fast)
