"""Training checkpoints that survive a kill at any moment, and a log that a resume does not repeat.

`checkpoint-STEP/` is written as a hidden sibling `.checkpoint-STEP.tmp-partial/` (every rank writes
its part there), then rank 0 writes `checkpoint.json` (the manifest: step and the size of every
file) and renames the folder into place. A `checkpoint-STEP/` without a manifest that matches its
files is torn (an older version, a copy cut short, a disk that filled): `--resume` skips it with a
warning and takes the newest complete one. Torch-free.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Callable

from ..utils import atomic

MANIFEST = "checkpoint.json"
FORMAT = "llava-fitprune.lvprune-checkpoint"
VERSION = 1
_NAME = re.compile(r"checkpoint-(\d+)$")
_PARTIAL = f"{atomic.TMP_MARK}partial"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which and what to do."""


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def write_checkpoint(output_dir: str, step: int, write: Callable[[str], None], rank: int = 0, world: int = 1) -> str:
    """`write(folder)` fills the checkpoint (on every rank); it appears as checkpoint-STEP only once
    complete. Returns the final folder."""
    final = checkpoint_dir(output_dir, step)
    partial = os.path.join(output_dir, f".checkpoint-{step}{_PARTIAL}")
    if rank == 0:
        atomic.remove_path(partial)  # left by a run killed while writing this step
        os.makedirs(partial)
    _barrier(world)
    try:
        write(partial)
    except BaseException:
        if world == 1:
            atomic.remove_path(partial)
        raise
    _barrier(world)
    if rank == 0:
        files = {os.path.relpath(os.path.join(root, n), partial): os.path.getsize(os.path.join(root, n))
                 for root, _, names in os.walk(partial) for n in names}
        atomic.write_json(os.path.join(partial, MANIFEST), {"format": FORMAT, "version": VERSION, "step": step,
                                                            "files": dict(sorted(files.items()))})
        atomic.publish_dir(partial, final)
    _barrier(world)
    return final


def remove_partials(output_dir: str) -> list[str]:
    """Hidden half-written checkpoint folders of killed runs (rank 0, before training starts)."""
    gone = glob.glob(os.path.join(glob.escape(output_dir), f".checkpoint-*{_PARTIAL}"))
    for p in gone:
        atomic.remove_path(p)
    return gone


def incomplete_reason(folder: str) -> str | None:
    """None if `folder` is a complete checkpoint, else why not."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (written last, so the run stopped while writing it, or it predates manifests)"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, size in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return f"{name} is missing or not the {size} bytes the manifest records"
    return None


def find_checkpoint(output_dir: str, resume: str, warn=lambda msg: print(msg, file=sys.stderr)) -> str | None:
    """The checkpoint `--resume` names, or for "latest" the newest complete checkpoint-STEP in
    output_dir (None if there is none); torn ones are skipped with a warning."""
    if resume != "latest":
        reason = incomplete_reason(resume) if os.path.isdir(resume) else "no such folder"
        if reason:
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint: {reason}: pass a complete "
                                  f"checkpoint-STEP folder, or --resume alone for the newest complete one")
        return resume
    found = sorted(((int(m.group(1)), d) for d in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*"))
                    if os.path.isdir(d) and (m := _NAME.search(d))), reverse=True)
    for _, folder in found:
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        warn(f"warning: --resume skips {folder}: incomplete: {reason}; delete it")
    return None


def trim_log(path: str, last_step: int) -> int:
    """Keep the log rows of steps <= last_step (the resumed position; 0: a fresh start keeps none),
    dropping a torn last line. Returns the rows kept."""
    if not os.path.isfile(path):
        return 0
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(json.dumps(row) + "\n")
    atomic.write_text(path, "".join(kept))
    return len(kept)
