"""LLaVA's scripts/convert_vqav2_for_submission.py: merged answers -> VQAv2 upload JSON.

    python -m llava_fitprune.eval.convert.convert_vqav2_for_submission --split llava_vqav2_mscoco_test-dev2015 --ckpt X

Reads <dir>/answers/<split>/<ckpt>/merge.jsonl and writes <dir>/answers_upload/<split>/<ckpt>.json with
one {"question_id", "answer"} per question of the full test2015 file (questions outside test-dev get
''), answers normalised by LLaVA's EvalAIAnswerProcessor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..io import EvalInputError, read_jsonl, require_file, write_json
from ..llava_files import load_llava_eval

TEST_FILE = "llava_vqav2_mscoco_test2015.jsonl"


def read_results(src: str) -> tuple[dict, int]:
    """LLaVA skips unreadable lines and reports how many; so do we."""
    results, errors = {}, 0
    with open(require_file(src, "answers file"), encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
                results[r["question_id"]] = r["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                errors += 1
    return results, errors


def convert(src: str, test_file: str, dst: str) -> list[dict]:
    EvalAIAnswerProcessor = load_llava_eval("m4c_evaluator").EvalAIAnswerProcessor

    results, errors = read_results(src)
    test_split = read_jsonl(test_file, "VQAv2 test question file")
    print(f"total results: {len(results)}, total split: {len(test_split)}, error_line: {errors}")
    process = EvalAIAnswerProcessor()
    answers = [{"question_id": q["question_id"],
                "answer": process(results[q["question_id"]]) if q["question_id"] in results else ""}
               for q in test_split]
    write_json(dst, answers, indent=None)
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="./playground/data/eval/vqav2")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--src", default=None, help="default: <dir>/answers/<split>/<ckpt>/merge.jsonl")
    p.add_argument("--test-file", default=None, help=f"default: <dir>/{TEST_FILE}")
    p.add_argument("--dst", default=None, help="default: <dir>/answers_upload/<split>/<ckpt>.json")
    args = p.parse_args(argv)
    src = args.src or os.path.join(args.dir, "answers", args.split, args.ckpt, "merge.jsonl")
    dst = args.dst or os.path.join(args.dir, "answers_upload", args.split, f"{args.ckpt}.json")
    try:
        out = convert(src, args.test_file or os.path.join(args.dir, TEST_FILE), dst)
    except EvalInputError as e:
        print(f"convert_vqav2_for_submission: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(out)} answers to {dst} (submit to the VQAv2 EvalAI server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
