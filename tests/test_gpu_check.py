"""scripts/gpu_check.sh, up to the point that needs CUDA: every step at a tiny shape on the CPU, and
its targets table (scripts/gpu_targets.py): every line, PASS / FAIL / not measured."""
import csv
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_targets

BENCH_ROWS = ("stock", "dense", "dense-fast", "fitprune", "fitprune-fast", "oracle", "oracle-fast")
HF_VENV = REPO / ".venv-hf" / "bin" / "python"


def _smoke(out: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    if HF_VENV.exists():
        env["PYTHON_HF"] = str(HF_VENV)
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke", str(out)], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _target_lines(text: str) -> dict:
    """target name -> status column of the targets table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("figure", "---"):
            rows[cells[0]] = cells[3]
    return rows


def _raw(out: Path) -> dict:
    with tarfile.open(out / "gpu_check_raw.tar.gz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode(errors="replace")
                for m in tar.getmembers() if m.isfile()}


def test_gpu_check_cpu_smoke_runs_every_step_and_target(tmp_path):
    out = _smoke(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("b1", "b8", "eval", "cuda"):
        assert f"step {step}: ok" in log, log
    if HF_VENV.exists():
        assert "step hf: ok" in log and "hf fast path:" in log, log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "gpu_check_raw.tar.gz", "targets.md"]
    raw = _raw(tmp_path)
    for tag in ("b1", "b2"):  # batch 1 and (the smoke's stand-in for) 8: every row on both
        methods = [r["method"] for r in csv.DictReader(io.StringIO(raw[f"cpu-smoke-fp32-sdpa-{tag}.csv"]))]
        assert sorted(methods) == sorted(BENCH_ROWS), (tag, methods)
    assert "test_fast_path_cuda_bf16_same_tokens" in raw["cuda.txt"]
    if HF_VENV.exists():  # the hf FitPrune row prunes (its dense row does not)
        hf = {r["method"]: r for r in csv.DictReader(io.StringIO(raw["hf_rows.csv"]))}
        fast = hf["dense"]["hf_fast_path"].startswith("on this base")  # h-hfcompile's enable_fast_path
        assert set(hf) == {"dense", "fitprune"} | ({"dense-fast", "fitprune-fast"} if fast else set()), hf
        for method, r in hf.items():
            assert (int(r["visual_tokens_kept"]) < int(r["visual_tokens"])) if "fitprune" in method else \
                r["visual_tokens_kept"] == "", (method, r)
    ev = json.loads(raw["eval_row.json"])
    assert set(ev["rows"]) == {"stock", "fitprune-fast"} and ev["new_tokens"] == 3 and ev["project"] == 5000
    assert all(len(r["per_question_s"]) == ev["questions"] for r in ev["rows"].values())
    table = (tmp_path / "targets.md").read_text()
    lines = _target_lines(table)
    assert set(lines) == {t.name for t in gpu_targets.TARGETS}, table
    for name, status in lines.items():  # every figure measured (at the smoke shape) and judged
        assert status.split(" ")[0] in ("PASS", "FAIL") and "smoke: not a GPU figure" in status, (name, status)


def test_gpu_check_budget_spent_skips_steps_but_prints_the_table(tmp_path):
    out = _smoke(tmp_path, TOTAL_BUDGET="0")
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("b1", "b8", "eval", "hf", "cuda"):
        assert f"step {step}: skipped (budget spent" in log, log
    lines = _target_lines((tmp_path / "targets.md").read_text())
    assert len(lines) == len(gpu_targets.TARGETS) and set(lines.values()) == {"not measured"}


def _bench(method, **cols):
    return {"method": method, "ratio": "0.0" if method.startswith(("dense", "stock")) else "0.6", **cols}


B1 = [_bench("stock"), _bench("dense-fast", decode_ms_per_token="9"),
      _bench("fitprune-fast", speedup_vs_stock="2.0", speedup_vs_dense_fast="1.4", decode_ms_per_token="13")]
B8 = [_bench("fitprune-fast", time_vs_oracle="1.05"), _bench("fitprune", time_vs_oracle="1.2"),
      _bench("fitprune-fast", time_vs_oracle="0.5") | {"ratio": "0.9"}]  # another ratio: not the target's


def test_targets_pass_fail_and_not_measured():
    lines = _target_lines(gpu_targets.table(B1, B8, {"projected_speedup": 2.6}, smoke=False, device="H100"))
    assert lines == {
        "batch-1 prefill, fitprune-fast 0.6 vs stock LLaVA": "PASS",
        "batch-1 prefill, fitprune-fast 0.6 vs dense-fast": "FAIL",
        "batch-1 decode per token, fitprune-fast 0.6": "FAIL",
        "batch-1 decode per token, dense-fast": "PASS",
        "batch-8 prefill, fitprune-fast vs oracle-fast": "PASS",
        "batch-8 prefill, fitprune (eager) vs oracle (eager)": "FAIL",
        "eval row: 5,000 TextVQA-shaped questions, fitprune-fast vs stock, compile included": "PASS",
    }


@pytest.mark.parametrize("missing", ["fitprune-fast", "dense-fast"])
def test_targets_missing_row_reads_not_measured(missing):
    b1 = [r for r in B1 if r["method"] != missing]
    lines = _target_lines(gpu_targets.table(b1, [], {}, smoke=False, device="H100"))
    assert len(lines) == len(gpu_targets.TARGETS)  # a missing row never drops a line
    for t in gpu_targets.TARGETS:
        measured = t.source == "b1" and t.method != missing
        assert (lines[t.name] != "not measured") == measured, (t.name, lines[t.name])
    assert math.isnan(gpu_targets.csv_value(b1, missing, "decode_ms_per_token"))


def test_eval_row_projection_counts_the_compiling_questions_once():
    import eval_row

    # a first question that compiles (10 s), then steady ones: measured total + the rest at the later half's mean
    p = eval_row.projection([10.0, 2.0, 1.0, 1.0], project=10)
    assert p["steady_s_per_question"] == 1.0 and p["measured_total_s"] == 14.0
    assert p["projected_s"] == 14.0 + 6 * 1.0


def test_gpu_check_without_cuda_refuses_before_writing(tmp_path):
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], check=False, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()
