"""MMBench's TSV read without pandas, with pandas' notion of an empty cell (LLaVA reads it with pandas)."""
from __future__ import annotations

import csv
import sys

from .io import EvalInputError, require_file

ALL_OPTIONS = ["A", "B", "C", "D"]
REQUIRED_COLUMNS = ("index", "question", "image")
# pandas.read_table turns these cells into NaN, which LLaVA's is_none() treats as absent.
NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def is_na(value) -> bool:
    """pandas' empty cell (NaN after read_table): what LLaVA's upload sheet leaves blank."""
    return value is None or value in NA_STRINGS


def is_none(value) -> bool:
    """LLaVA's model_vqa_mmbench.is_none on the pandas value: also the text "none" in any case."""
    return is_na(value) or str(value).lower() in ("nan", "none")


def read_tsv(path: str) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts of strings)."""
    path = require_file(path, "MMBench TSV")
    csv.field_size_limit(sys.maxsize)  # images are base64 cells
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")  # quoting as pandas: a cell may be "quoted"
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise EvalInputError(f"{path} lacks column(s) {missing} (has {columns}); is it an MMBench TSV?")
    return columns, rows


def get_options(row: dict) -> list[str]:
    options = []
    for option in ALL_OPTIONS:
        value = row.get(option)
        if is_none(value):
            break
        options.append(value)
    return options


def parse_index(value: str):
    """pandas reads the index column as integers."""
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else text
