"""Atomic writes (#16 item 17): a writer that fails half-way leaves the previous file whole, never a torn one."""
from __future__ import annotations

import json
import os

import pytest

from llava_fitprune.utils import atomic


class Unwritable:
    """Serialises half-way, then fails: what a kill in the middle of a write looks like to the file."""

    def __str__(self):
        raise RuntimeError("killed mid-write")


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    with pytest.raises(TypeError):
        atomic.write_json(path, {"a": 2, "b": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["report.json"]
    with atomic.atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)  # savefig reads the suffix
        open(tmp, "wb").write(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_a_folder_appears_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with atomic.atomic_dir(target) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(target) as tmp:
            open(os.path.join(tmp, "a"), "w").write("2")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "1" and os.listdir(tmp_path) == ["ckpt"]
    with atomic.atomic_dir(target) as tmp:  # an existing folder is replaced as a whole
        open(os.path.join(tmp, "b"), "w").write("3")
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["ckpt"]
    stale = tmp_path / f".ckpt{atomic.TMP_MARK}123-abc"
    stale.mkdir()
    assert atomic.remove_stale_temporaries(tmp_path, "ckpt") == [str(stale)]


def test_fit_report_survives_a_failed_rewrite(tmp_path, monkeypatch):
    """`fit` killed while writing fit_report.json keeps the previous one whole."""
    from llava_fitprune.cli import fit as fit_cli
    from llava_fitprune.adapters.llava import builder, calibration
    from llava_fitprune.core import fit as core_fit
    from llava_fitprune.core.recipe import Recipe

    def fit(model, calib, ratios, *, report, **kw):
        report["late"] = Unwritable()  # json.dump reaches it after writing the keys before it
        return [Recipe([0, 2, 0, 0], 4, reduction_ratio=0.5, achieved_reduction=0.5, provenance={"alpha": 1.0})]

    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: (None, None, None, None))
    monkeypatch.setattr(calibration, "build_calibration", lambda *a, **k: None)
    monkeypatch.setattr(core_fit, "fit", fit)
    monkeypatch.setattr(fit_cli, "plot", lambda *a: None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fit_report.json").write_text('{"old": true}')
    calib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval_data", "calibration", "tiny")
    args = fit_cli.parse_args(["--model-path", "org/model", "--question-file", os.path.join(calib, "questions.jsonl"),
                               "--image-folder", os.path.join(calib, "images"), "--reduction-ratio", "0.5",
                               "--out", str(out), "--device", "cpu"])
    with pytest.raises(RuntimeError, match="killed mid-write"):
        fit_cli.run_fit(args, [0.5])
    assert (out / "fit_report.json").read_text() == '{"old": true}'
    assert sorted(os.listdir(out)) == ["fit_report.json", "model-fitprune-r0.5-total.json"]


def test_accuracy_outputs_survive_a_failed_rewrite(tmp_path, monkeypatch):
    from llava_fitprune.synth import accuracy_report as report

    monkeypatch.setattr(report, "markdown", lambda rows, prov: "table")
    monkeypatch.setattr(report, "comparison", lambda results, preds: "comparison")
    monkeypatch.setattr(report, "plot", lambda results, path: path)
    report.write_all(str(tmp_path), [], [], [{"q": 1}, {"q": 2}], {"seed": 0}, {})
    before = _files(tmp_path)
    with pytest.raises(TypeError):
        report.write_all(str(tmp_path), [], [], [{"q": 1}, {"q": object()}], {"seed": 0}, {})
    with pytest.raises(TypeError):
        report.write_all(str(tmp_path), [], [], [{"q": 1}], {"seed": 0, "late": object()}, {})
    after = _files(tmp_path)
    assert after["predictions.jsonl"] == before["predictions.jsonl"]
    assert after["accuracy.json"] == before["accuracy.json"] and set(after) == set(before)


def test_bench_csv_and_plots_survive_a_failed_rewrite(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from llava_fitprune.bench.report import write_csv
    from llava_fitprune.utils.plots import plot_schedules
    from llava_fitprune.core.recipe import Recipe

    row = {"attn": "sdpa", "batch": 1, "method": "dense", "prefill_runs": [0.01]}
    write_csv([row, row], str(tmp_path / "bench.csv"))
    plot_schedules([Recipe([1, 1], 4)], str(tmp_path / "plot.png"))
    before = _files(tmp_path)
    with pytest.raises(TypeError):
        write_csv([row, {**row, "prefill_runs": ["x"]}], str(tmp_path / "bench.csv"))

    def torn_savefig(self, path, **kw):
        open(path, "wb").write(b"half a png")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    with pytest.raises(RuntimeError):
        plot_schedules([Recipe([1, 1], 4)], str(tmp_path / "plot.png"))
    assert _files(tmp_path) == before


def test_lvprune_modules_survive_a_failed_save(tmp_path, monkeypatch):
    import safetensors.torch

    from llava_fitprune.lvprune import LVPruneConfig, LVPruneModules

    modules = LVPruneModules(LVPruneConfig(hidden_size=16, num_layers=2, layers=[1], keep=[0.5], width=8, heads=2))
    modules.save(str(tmp_path))
    before = _files(tmp_path)
    real = safetensors.torch.save_file

    def torn_save_file(tensors, path, metadata=None):
        real(tensors, path, metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save_file)
    with pytest.raises(RuntimeError):
        modules.save(str(tmp_path))
    assert _files(tmp_path) == before
    monkeypatch.undo()
    reloaded = LVPruneModules.load(str(tmp_path))
    assert reloaded.config == modules.config
