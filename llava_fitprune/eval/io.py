"""Reading benchmark files with errors that name the file (and line), and atomic JSON writes.

Kept free of torch/llava imports: converters, the merge step and the report import it cheaply.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator


class EvalInputError(ValueError):
    """Bad input to an eval step: a missing or corrupt file, a missing field. The message says which."""


def require_file(path: str, what: str = "file") -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise EvalInputError(f"{what} {path} does not exist")
    return path


def read_json(path: str, what: str = "JSON file") -> Any:
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{what} {path} is not valid JSON: {e}") from None


def read_jsonl(path: str, what: str = "JSONL file") -> list[dict]:
    """One JSON object per non-blank line; a bad line raises naming the file and line number."""
    path = require_file(path, what)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{what} {path} line {lineno} is not valid JSON: {e}") from None
    return rows


def require_fields(row: dict, fields: Iterable[str], source: str, index: int) -> None:
    if not isinstance(row, dict):
        raise EvalInputError(f"{source} entry {index} is a {type(row).__name__}, expected a JSON object")
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvalInputError(f"{source} entry {index} lacks field(s) {missing} (has {sorted(row)})")


def require_image_name(value, source: str, index: int, question_id, text_only_hint: str = "") -> None:
    """An image field must name a file: null or "" would crash deep in the loader (or run text-only)."""
    if not isinstance(value, str) or not value.strip():
        raise EvalInputError(f"{source} entry {index} (question {question_id}) has image {value!r}, not a file "
                             f"name: give the image's file name (relative to --image-folder){text_only_hint}")


def require_answers(rows: list, path: str) -> list:
    """Zero answers is never a score (an empty question file, a run that wrote nothing)."""
    if not rows:
        raise EvalInputError(f"{path} holds no answers, so there is nothing to score: check that the question "
                             f"file has questions and that the generation step finished")
    return rows


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator:
    """`open(path, mode)` whose file replaces `path` only when the block ends without an error
    (`llava_fitprune.utils.atomic.atomic_path`: temporary sibling, fsync, rename), so a reader never sees half a file."""
    from ..utils.atomic import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str, data: Any, indent: int | None = 2) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    from ..utils.atomic import write_json as write_atomically  # here, not at the top: a one-place change

    write_atomically(path, data, indent=indent, ensure_ascii=False)  # temporary file, fsync, rename


def file_sha256(path: str) -> str:
    """The content hash that ties answers to the exact question file they answer."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SCORE_SUFFIX = ".score.json"
SCORE_FORMAT = "llava-fitprune.eval-score"
SCORE_VERSION = 2  # 2: answers_sha256, scored_at, source, coverage


def meta_path(answers_file: str) -> str:
    return f"{answers_file}.meta.json"


def score_path(answers_file: str) -> str:
    return f"{answers_file}{SCORE_SUFFIX}"


def write_score(score_file: str, benchmark: str, metric: str, score: float | None, answers_file: str | None,
                details: dict | None = None, num_samples: int | None = None, coverage: dict | None = None,
                source: dict | None = None) -> dict:
    """The score sidecar the report reads: one headline number plus whatever details the scorer has.

    It records the sha256 of the answers it describes: `<answers>` for a score file named
    `<answers>.score.json` (GQA scores its converted predictions into the merged answers' score
    file), else `answers_file`. The report shows the score only while the answers still hash to it.
    `coverage` ({"scored", "total", "unit"}) says when the score covers part of the benchmark."""
    scored = os.fspath(answers_file) if answers_file is not None else None
    described = score_file[: -len(SCORE_SUFFIX)] if score_file.endswith(SCORE_SUFFIX) else scored
    if described is None or not os.path.isfile(described):
        described = scored
    data = {"format": SCORE_FORMAT, "version": SCORE_VERSION, "benchmark": benchmark, "metric": metric,
            "score": score, "num_samples": num_samples, "answers_file": described,
            "answers_sha256": file_sha256(described) if described and os.path.isfile(described) else None,
            "scored_file": scored, "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": source or {"kind": "scorer"}, "coverage": coverage, "details": details or {}}
    write_json(score_file, data)
    return data
