"""LLaVA's scripts/convert_gqa_for_eval.py: answers JSONL -> GQA predictions JSON.

    python -m llava_fitprune.eval.convert.convert_gqa_for_eval --src merge.jsonl --dst testdev_balanced_predictions.json

Output: [{"questionId": ..., "prediction": answer lower-cased, trailing periods removed}, ...]
"""
from __future__ import annotations

import argparse
import sys

from ..io import EvalInputError, read_jsonl, write_json


def predictions_of(rows: list[dict]) -> list[dict]:
    return [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in rows]


def convert(src: str, dst: str) -> list[dict]:
    predictions = predictions_of(read_jsonl(src, "answers file"))
    write_json(dst, predictions, indent=None)
    return predictions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="answers JSONL (the merged file)")
    p.add_argument("--dst", required=True, help="predictions JSON for GQA's evaluator")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst)
    except EvalInputError as e:
        print(f"convert_gqa_for_eval: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(out)} predictions to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
