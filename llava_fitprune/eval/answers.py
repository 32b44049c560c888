"""An answers file that can be resumed, with its `<answers>.meta.json` sidecar.

Answers are appended and flushed one by one. The sidecar is written when a run starts
(`complete: false`), refreshed after every batch, and gets `complete: true` only after the last
answer is on disk, so a partial file is never mistaken for a finished one. Rerunning the same
command skips the questions already answered: an answer is identified by its question id, round
and prompt (LLaVA's TextVQA file repeats a question id for every question about one image).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Optional

from ..core.flops import LMShape
from .io import EvalInputError, meta_path, write_json
from .prefill import summarize

META_FORMAT = "llava-fitprune.eval-meta"
META_VERSION = 2  # 2: device_type, recipe_file_sha256, attn_implementation_requested
# Settings that change the answers: a resumed run must match the run it continues (the attention
# implementation and dtype as the model resolved them; the device type, whose kernels round differently).
RESUME_KEYS = ("model_path", "model_base", "module", "method", "reduction_ratio", "recipe", "conv_mode",
               "temperature", "top_p", "num_beams", "max_new_tokens", "num_chunks", "chunk_idx",
               "question_file_name", "question_file_sha256", "image_folder", "single_pred_prompt", "all_rounds",
               "lang", "device_type", "dtype", "attn_implementation")
# Known only once the model is loaded; before, the recipe is compared as given (file and content) and the
# attention implementation where it was asked for (`check_before_loading`).
LOADED_KEYS = ("recipe", "attn_implementation")
GIVEN_KEYS = ("recipe_file", "recipe_file_sha256")
# Settings that do not change the answers, so answers written with other values are kept.
NEUTRAL_KEYS = ("batch_size", "compile")
NEUTRAL_WHY = ("the batch size and --compile do not change answers (batched == one-by-one and compiled == eager "
               "are tested: tests/test_equivalence.py, tests/test_fast_path.py)")


def answer_key(record: dict) -> str:
    return json.dumps([record.get("question_id"), record.get("round_id"), record.get("prompt")])


def read_answers(path: str, repair: bool = False) -> list[dict]:
    """Parse an answers file. A torn last line (the run was killed mid-write) is cut off when
    `repair`, otherwise reported; a bad line elsewhere is always an error naming the line."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    rows, good_bytes = [], 0
    for lineno, line in enumerate(lines, 1):
        torn = not line.endswith(b"\n")  # only the last line can lack its newline
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not torn:
                raise EvalInputError(f"answers file {path} line {lineno} is not valid JSON: {e}; "
                                     f"delete the file to start over") from None
            if not repair:
                raise EvalInputError(f"answers file {path} ends with a partial line: rerun the "
                                     f"generation command to resume it") from None
            print(f"[resume] {path}: dropping a partial last line")
            with open(path, "r+b") as f:
                f.truncate(good_bytes)
            break
        good_bytes += len(line)
        if torn and repair:  # a whole record that lost only its newline
            with open(path, "ab") as f:
                f.write(b"\n")
    return rows


def converted_images(rows: list[dict]) -> dict:
    """The sidecar's note of images converted to RGB because stock LLaVA would crash on their mode."""
    ids = [r.get("question_id") for r in rows if (r.get("metadata") or {}).get("image_converted_to_rgb")]
    return {"count": len(ids), "question_ids": ids}


def read_meta(answers_file: str) -> Optional[dict]:
    path = meta_path(answers_file)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path} is not valid JSON ({e}); delete it and {answers_file} to start over") from None
    if meta.get("format") != META_FORMAT:
        raise EvalInputError(f"{path} is not an llava-fitprune eval sidecar (format {meta.get('format')!r})")
    if meta.get("version", 1) < 2 and meta.get("device") and "device_type" not in meta:
        meta["device_type"] = str(meta["device"]).split(":")[0]  # version 1 kept the model's device, e.g. cuda:0
    return meta


def require_sidecar(answers_file: str, meta: Optional[dict]) -> None:
    """An answers file without our sidecar (e.g. from LLaVA's own scripts) cannot be resumed."""
    if meta is None and os.path.exists(answers_file) and os.path.getsize(answers_file) > 0:
        raise EvalInputError(
            f"{answers_file} exists but has no {os.path.basename(meta_path(answers_file))} sidecar, so it was not "
            f"written by llava_fitprune and cannot be resumed: move it away or pick another --answers-file")


class AnswerFile:
    """Usage: `done = af.open()`; `af.write(record)` per answer; `af.checkpoint()` per batch; `af.finish()`
    (or `af.stop_at_limit(n)`)."""

    def __init__(self, path: str, config: dict, keys: list[str], lm_shape: LMShape):
        self.path = os.path.expanduser(path)
        self.config = config
        self.keys = keys  # one per question of this chunk, in order
        self.shape = lm_shape
        self.meta: dict = {}
        self.old_meta: dict = {}  # the sidecar found by `open` (the earlier sessions' settings)
        self._file = None
        self._t0 = time.time()
        self._previous_wall = 0.0
        self.num_answers = 0

    # -- start ---------------------------------------------------------------------------------
    def open(self) -> Counter:
        """Check an existing file is a resumable match, write the meta (incomplete); return done keys."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        old_meta = read_meta(self.path)
        require_sidecar(self.path, old_meta)
        rows = read_answers(self.path, repair=True) if os.path.exists(self.path) else []
        if old_meta is not None:
            self._check_same_run(old_meta)
            self.old_meta = old_meta
            self._previous_wall = float(old_meta.get("wall_time_s") or 0.0)
        done = Counter(answer_key(r) for r in rows)
        unknown = done - Counter(self.keys)
        if unknown:
            raise EvalInputError(f"{self.path} holds {sum(unknown.values())} answers to questions that are not in "
                                 f"this chunk (e.g. {next(iter(unknown))}): it belongs to another question file or "
                                 f"chunking; delete it to start over")
        self.num_answers = len(rows)
        if 0 < len(rows) < len(self.keys):
            print(f"[resume] {self.path}: {len(rows)} of {len(self.keys)} answers already written"
                  f"{reuse_note(old_meta or {}, self.config)}")
        self.meta = {"format": META_FORMAT, "version": META_VERSION, "kind": "chunk", "complete": False,
                     **self.config, "lm_shape": self.shape.to_dict(), "num_questions": len(self.keys),
                     "num_answers": self.num_answers, "sessions": int((old_meta or {}).get("sessions", 0)) + 1,
                     "wall_time_s": self._previous_wall,
                     "started_at": (old_meta or {}).get("started_at") or _now(), "prefill": None}
        write_json(meta_path(self.path), self.meta)
        self._file = open(self.path, "a", encoding="utf-8")
        return done

    def _check_same_run(self, old: dict) -> None:
        check_same_run(self.path, old, self.config, RESUME_KEYS)

    # -- progress ------------------------------------------------------------------------------
    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.num_answers += 1

    def checkpoint(self) -> None:
        self.meta.update(num_answers=self.num_answers, wall_time_s=self._wall(), updated_at=_now())
        write_json(meta_path(self.path), self.meta)

    def stop_at_limit(self, limit: int) -> None:
        """Leave the file incomplete on purpose (--limit): `merge --partial` may take it, marked partial."""
        self.meta["stopped_at_limit"] = limit
        self.checkpoint()

    def finish(self) -> dict:
        """Summarise the whole file (earlier sessions included) and mark it complete."""
        self._file.close()
        rows = read_answers(self.path)
        if len(rows) != len(self.keys):
            raise RuntimeError(f"{self.path} has {len(rows)} answers for {len(self.keys)} questions")
        self.meta.update(num_answers=len(rows), wall_time_s=self._wall(), updated_at=_now(), finished_at=_now(),
                         prefill=summarize(rows, self.shape), images_converted_to_rgb=converted_images(rows))
        self.meta["complete"] = True  # last: only now is the file whole
        write_json(meta_path(self.path), self.meta)
        return self.meta

    def _wall(self) -> float:
        return self._previous_wall + (time.time() - self._t0)


def check_same_run(path: str, old: dict, config: dict, keys) -> None:
    """Refuse to continue (or to call complete) a file written with other settings."""
    diffs = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in keys if _norm(old.get(k)) != _norm(config.get(k))]
    if diffs:
        changed = ("question_file_sha256" in keys and old.get("question_file_sha256")
                   != config.get("question_file_sha256"))
        what = f"the question file {config.get('question_file')} changed since" if changed else "other settings"
        raise EvalInputError(
            f"{path} was written with {what} ({'; '.join(diffs)}); continuing would mix answers of two runs: "
            f"rerun with the earlier settings, delete {path} and its .meta.json, or write to another --answers-file "
            f"(the scripts: another CKPT)")


def check_before_loading(path: str, old: dict, config: dict) -> bool:
    """`check_same_run` on what is known before the model loads; return whether that is every
    answer-changing setting (else only the loaded model can tell: an attention implementation left to
    its default after an explicit one, or a sidecar from an older version that lacks a key)."""
    keys = [k for k in RESUME_KEYS if k not in LOADED_KEYS] + list(GIVEN_KEYS)
    seen = dict(config)
    requested = config.get("attn_implementation_requested")
    if requested is not None:  # compared with what the earlier run resolved
        seen["attn_implementation"] = requested
        keys.append("attn_implementation")
    check_same_run(path, old, seen, [k for k in keys if k in old])
    default_both = requested is None and "attn_implementation_requested" in old and \
        old["attn_implementation_requested"] is None
    return all(k in old for k in keys) and (requested is not None or default_both)


def reuse_note(old: dict, config: dict) -> str:
    """'' or why answers written with another batch size or --compile are kept."""
    changed = [f"{k} {old[k]!r} -> {config.get(k)!r}" for k in NEUTRAL_KEYS if k in old and old[k] != config.get(k)]
    return f"; reusing its answers although {', '.join(changed)}: {NEUTRAL_WHY}" if changed else ""


def _norm(value):
    if isinstance(value, str):
        return os.path.normpath(os.path.expanduser(value))
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
