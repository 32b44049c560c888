"""Reading benchmark files with errors that name the file (and line), and atomic JSON writes.

Kept free of torch/llava imports: converters, the merge step and the report import it cheaply.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable


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


def write_json(path: str, data: Any, indent: int | None = 2) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    from ..atomic import write_json as write_atomically  # here, not at the top: a one-place change

    write_atomically(path, data, indent=indent, ensure_ascii=False)  # temporary file, fsync, rename


def meta_path(answers_file: str) -> str:
    return f"{answers_file}.meta.json"


def score_path(answers_file: str) -> str:
    return f"{answers_file}.score.json"


def write_score(score_file: str, benchmark: str, metric: str, score: float | None, answers_file: str | None,
                details: dict | None = None, num_samples: int | None = None) -> dict:
    """The score sidecar the report reads: one headline number plus whatever details the scorer has."""
    data = {"format": "llava-fitprune.eval-score", "benchmark": benchmark, "metric": metric, "score": score,
            "num_samples": num_samples, "answers_file": None if answers_file is None else os.fspath(answers_file),
            "details": details or {}}
    write_json(score_file, data)
    return data
