"""LLaVA's scripts/convert_mmbench_for_submission.py: answers -> the .xlsx MMBench's server grades.

    python -m llava_fitprune.eval.convert.convert_mmbench_for_submission --annotation-file mmbench_dev_20230712.tsv \
        --result-dir answers/mmbench_dev_20230712 --upload-dir answers_upload/mmbench_dev_20230712 --experiment X

Reads <result-dir>/<experiment>.jsonl; writes <upload-dir>/<experiment>.xlsx: the TSV without its
hint, category, source, image, comment and l2-category columns, with a `prediction` column after D
(for --all-rounds answers the last round of a question wins, as in LLaVA).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..io import EvalInputError, read_jsonl
from ..mmbench_tsv import is_na, parse_index, read_tsv
from .xlsx import write_xlsx

DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_COLUMN = 6  # where LLaVA inserts it: after index, question, A, B, C, D


def _cell(column: str, value: str):
    if is_na(value):  # pandas' NaN; an option "none" is text that LLaVA's sheet keeps
        return None
    return parse_index(value) if column == "index" else value


def convert(annotation_file: str, result_file: str, upload_file: str) -> int:
    columns, rows = read_tsv(annotation_file)
    predictions = {}
    for a in read_jsonl(result_file, "answers file"):
        predictions[a["question_id"]] = a["text"]
    kept = [c for c in columns if c not in DROPPED]
    header = kept[:PREDICTION_COLUMN] + ["prediction"] + kept[PREDICTION_COLUMN:]
    table, answered = [], 0
    for row in rows:
        index = parse_index(row["index"])
        answered += index in predictions
        values = [_cell(c, row[c]) for c in kept]
        table.append(values[:PREDICTION_COLUMN] + [predictions.get(index)] + values[PREDICTION_COLUMN:])
    unknown = set(predictions) - {parse_index(r["index"]) for r in rows}
    if unknown:
        raise EvalInputError(f"{result_file} answers indices not in {annotation_file}: {sorted(unknown)[:5]}")
    os.makedirs(os.path.dirname(os.path.abspath(upload_file)), exist_ok=True)
    write_xlsx(upload_file, header, table)
    if answered < len(rows):
        print(f"warning: {len(rows) - answered} of {len(rows)} questions have no prediction")
    return answered


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotation-file", required=True)
    p.add_argument("--result-dir", required=True)
    p.add_argument("--upload-dir", required=True)
    p.add_argument("--experiment", required=True)
    args = p.parse_args(argv)
    upload = os.path.join(args.upload_dir, f"{args.experiment}.xlsx")
    try:
        n = convert(args.annotation_file, os.path.join(args.result_dir, f"{args.experiment}.jsonl"), upload)
    except EvalInputError as e:
        print(f"convert_mmbench_for_submission: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} predictions to {upload} (submit to the MMBench evaluation server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
