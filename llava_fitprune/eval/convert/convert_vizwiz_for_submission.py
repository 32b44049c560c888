"""LLaVA's scripts/convert_vizwiz_for_submission.py: answers JSONL -> VizWiz upload JSON.

    python -m llava_fitprune.eval.convert.convert_vizwiz_for_submission --annotation-file llava_test.jsonl \
        --result-file answers/X.jsonl --result-upload-file answers_upload/X.json

Output: [{"image": ..., "answer": answer normalised by LLaVA's EvalAIAnswerProcessor}, ...] in
question-file order; every question must have an answer.
"""
from __future__ import annotations

import argparse
import sys

from ..io import EvalInputError, read_jsonl, write_json
from ..llava_files import load_llava_eval


def convert(annotation_file: str, result_file: str, upload_file: str) -> list[dict]:
    EvalAIAnswerProcessor = load_llava_eval("m4c_evaluator").EvalAIAnswerProcessor

    results = {r["question_id"]: r["text"] for r in read_jsonl(result_file, "answers file")}
    test_split = read_jsonl(annotation_file, "VizWiz question file")
    print(f"total results: {len(results)}, total split: {len(test_split)}")
    missing = [q["question_id"] for q in test_split if q["question_id"] not in results]
    if missing:
        raise EvalInputError(f"{result_file} has no answer for {len(missing)} question(s), e.g. {missing[:5]}; "
                             f"finish the run before converting")
    process = EvalAIAnswerProcessor()
    answers = [{"image": q["image"], "answer": process(results[q["question_id"]])} for q in test_split]
    write_json(upload_file, answers, indent=None)
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotation-file", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--result-upload-file", required=True)
    args = p.parse_args(argv)
    try:
        out = convert(args.annotation_file, args.result_file, args.result_upload_file)
    except EvalInputError as e:
        print(f"convert_vizwiz_for_submission: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(out)} answers to {args.result_upload_file} (submit to the VizWiz EvalAI server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
