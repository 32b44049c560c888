"""lvprune-train survives a kill while writing a checkpoint (#16 item 16): checkpoints appear only when
complete, --resume takes the newest complete one and skips torn ones, and the log repeats no step."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from llava_fitprune.lvprune.checkpoints import (CheckpointError, MANIFEST, find_checkpoint, incomplete_reason,
                                                trim_log, write_checkpoint)
from llava_fitprune.lvprune.engine import LOCAL_STATE, LocalEngine
from llava_fitprune.lvprune.train import main as train_main
from tests.test_methods import _argv, _write_dataset


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _log(folder):
    rows = [json.loads(l) for l in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_kill_mid_checkpoint_then_resume_matches_an_uninterrupted_run(tiny_gqa_dir, tmp_path, monkeypatch, capsys):
    data, images = _write_dataset(tmp_path, n=4)
    ref, out = tmp_path / "ref", tmp_path / "out"
    weights = os.path.join(tiny_gqa_dir, "model.safetensors")
    before = _sha(weights)
    argv = lambda folder: ["--model-path", tiny_gqa_dir] + _argv(data, images, folder, 4, 2) + ["--log-steps", "1"]
    assert train_main(argv(ref)) == 0

    save = LocalEngine.save_checkpoint

    def killed_at_step_4(self, folder, client_state):  # the kill lands half-way through the trainer state
        if client_state["state"]["step"] == 4:
            (open(os.path.join(folder, LOCAL_STATE), "wb")).write(b"torn")
            raise KeyboardInterrupt
        save(self, folder, client_state)

    monkeypatch.setattr(LocalEngine, "save_checkpoint", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_main(argv(out))
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]  # step 4 was logged before its checkpoint

    # what a SIGKILL leaves where no clean-up runs: a hidden half-written folder, and a torn checkpoint-6
    # (an older version of this code wrote in place)
    (out / ".checkpoint-4.tmp-partial").mkdir()
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "lvprune_config.json").write_text("{")
    capsys.readouterr()
    assert train_main(argv(out) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "skips" in err and "checkpoint-6" in err
    assert not (out / ".checkpoint-4.tmp-partial").exists()
    assert (out / "lvprune_modules.safetensors").read_bytes() == (ref / "lvprune_modules.safetensors").read_bytes()
    assert _log(out) == _log(ref)  # steps 1..4 once each, the resumed ones with the same numbers
    assert incomplete_reason(str(out / "checkpoint-4")) is None
    assert _sha(weights) == before  # the model is only read


def test_find_checkpoint_takes_the_newest_complete_one(tmp_path):
    def write(step, payload=b"x" * 10):
        return write_checkpoint(str(tmp_path), step, lambda d: (open(os.path.join(d, "state.bin"), "wb")).write(payload))

    write(2)
    five = write(5)
    assert find_checkpoint(str(tmp_path), "latest") == five
    with open(os.path.join(five, "state.bin"), "ab") as f:  # a file changed after the manifest was written
        f.write(b"more")
    (tmp_path / "checkpoint-9").mkdir()  # an empty folder: killed before anything was written
    warnings = []
    assert find_checkpoint(str(tmp_path), "latest", warn=warnings.append) == str(tmp_path / "checkpoint-2")
    assert len(warnings) == 2 and "checkpoint-9" in warnings[0] and "state.bin" in warnings[1]
    with pytest.raises(CheckpointError, match="--resume .*checkpoint-9"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-9"))
    write(9)  # rewriting a step replaces the torn folder
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-9")
    assert json.loads((tmp_path / "checkpoint-9" / MANIFEST).read_text())["files"] == {"state.bin": 10}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_trim_log_keeps_steps_up_to_the_resumed_one(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert trim_log(str(log), 2) == 2
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1, 2]
    assert trim_log(str(log), 0) == 0 and log.read_text() == ""  # a fresh start


def test_training_data_is_parsed_once_for_the_checks_and_the_dataset(tmp_path, monkeypatch):
    """lvprune-train checks --data-path before the model loads; make_dataset's own check then costs nothing
    (LLaVA's 665K mix is a 1 GB JSON), unless the file changed in between."""
    from llava_fitprune.lvprune import data

    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"conversations": []}]))
    calls, real = [], data._check_data
    monkeypatch.setattr(data, "_check_data", lambda *a: calls.append(a) or real(*a))
    assert data.check_data(str(path), None) == 1 and data.check_data(str(path), None) == 1
    path.write_text(json.dumps([{"conversations": []}] * 2))
    assert data.check_data(str(path), None) == 2 and len(calls) == 2
