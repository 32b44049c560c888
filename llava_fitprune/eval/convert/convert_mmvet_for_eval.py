"""LLaVA's scripts/convert_mmvet_for_eval.py: answers JSONL -> MM-Vet results JSON.

    python -m llava_fitprune.eval.convert.convert_mmvet_for_eval --src answers/X.jsonl --dst results/X.json

Output: {"v1_<question_id>": answer, ...}, the file MM-Vet's GPT-4 grader takes.
"""
from __future__ import annotations

import argparse
import sys

from ..io import EvalInputError, read_jsonl, write_json


def convert(src: str, dst: str) -> dict:
    results = {f"v1_{r['question_id']}": r["text"] for r in read_jsonl(src, "answers file")}
    write_json(dst, results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst)
    except EvalInputError as e:
        print(f"convert_mmvet_for_eval: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(out)} answers to {args.dst} (grade them with MM-Vet's evaluator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
