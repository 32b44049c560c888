"""Local scores for TextVQA, POPE, ScienceQA and GQA, printed as LLaVA's evaluators print them and
saved as `<answers>.score.json` for `llava-fitprune report`.

    python -m llava_fitprune.eval.score textvqa --annotation-file TextVQA_0.5.1_val.json --result-file A.jsonl
    python -m llava_fitprune.eval.score pope --annotation-dir coco --question-file llava_pope_test.jsonl \
        --result-file A.jsonl
    python -m llava_fitprune.eval.score sqa --base-dir scienceqa --result-file A.jsonl --output-file O.jsonl \
        --output-result R.json
    python -m llava_fitprune.eval.score gqa --data-dir gqa/data --tier testdev_balanced --score-file A.jsonl.score.json

TextVQA uses LLaVA's `prompt_processor` and `TextVQAAccuracyEvaluator`; ScienceQA runs LLaVA's
`eval_science_qa` itself; POPE applies LLaVA's yes/no rule; GQA is accuracy against the answers in
`<tier>_questions.json` (LLaVA runs GQA's own eval.py, which needs the full GQA distribution).
"""
from __future__ import annotations

import argparse
import os
import sys

from .io import SCORE_SUFFIX, EvalInputError, read_json, read_jsonl, require_answers, score_path, write_score
from .score_pope import score_pope
from .score_gqa import score_gqa
from .score_sqa import score_sqa

PERCENT = 100.0


def score_textvqa(annotation_file: str, result_file: str, score_file: str | None) -> dict:
    from llava.eval.eval_textvqa import prompt_processor
    from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator

    annotations = read_json(annotation_file, "TextVQA annotation file")["data"]
    annotations = {(a["image_id"], a["question"].lower()): a for a in annotations}
    results = require_answers(read_jsonl(result_file, "answers file"), result_file)
    print(os.path.splitext(os.path.basename(result_file))[0])
    pred_list = []
    for i, r in enumerate(results, 1):
        try:
            question = prompt_processor(r["prompt"])
        except (AssertionError, AttributeError):
            raise EvalInputError(f"{result_file} answer {i}: its prompt is not in a TextVQA format LLaVA's "
                                 f"prompt_processor knows: {r['prompt']!r}") from None
        key = (r["question_id"], question)
        if key not in annotations:
            raise EvalInputError(f"{result_file} answer {i}: no annotation for image {key[0]!r} and question "
                                 f"{key[1]!r} in {annotation_file}")
        pred_list.append({"pred_answer": r["text"], "gt_answers": annotations[key]["answers"]})
    accuracy = TextVQAAccuracyEvaluator().eval_pred_list(pred_list)
    print("Samples: {}\nAccuracy: {:.2f}%\n".format(len(pred_list), PERCENT * accuracy))
    return write_score(score_file or score_path(result_file), "textvqa", "accuracy", PERCENT * accuracy,
                       result_file, num_samples=len(pred_list),
                       coverage={"scored": len(pred_list), "total": len(annotations), "unit": "questions"})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="benchmark", required=True)
    t = sub.add_parser("textvqa")
    t.add_argument("--annotation-file", required=True)
    t.add_argument("--result-file", required=True)
    t.add_argument("--score-file", default=None)
    q = sub.add_parser("pope")
    q.add_argument("--annotation-dir", required=True)
    q.add_argument("--question-file", required=True)
    q.add_argument("--result-file", required=True)
    q.add_argument("--score-file", default=None)
    s = sub.add_parser("sqa")
    s.add_argument("--base-dir", required=True)
    s.add_argument("--result-file", required=True)
    s.add_argument("--output-file", required=True)
    s.add_argument("--output-result", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--score-file", default=None)
    g = sub.add_parser("gqa")
    g.add_argument("--data-dir", default=".", help="folder with <tier>_questions.json and <tier>_predictions.json")
    g.add_argument("--tier", default="testdev_balanced")
    g.add_argument("--questions", default=None, help="default: <data-dir>/<tier>_questions.json")
    g.add_argument("--predictions", default=None, help="default: <data-dir>/<tier>_predictions.json")
    g.add_argument("--score-file", default=None, help="default: <predictions>.score.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.benchmark == "textvqa":
            score_textvqa(args.annotation_file, args.result_file, args.score_file)
        elif args.benchmark == "pope":
            score_pope(args.annotation_dir, args.question_file, args.result_file, args.score_file)
        elif args.benchmark == "sqa":
            score_sqa(args.base_dir, args.result_file, args.output_file, args.output_result, args.split,
                      args.score_file)
        else:
            questions = args.questions or os.path.join(args.data_dir, f"{args.tier}_questions.json")
            predictions = args.predictions or os.path.join(args.data_dir, f"{args.tier}_predictions.json")
            described = (args.score_file[: -len(SCORE_SUFFIX)]  # the merged answers of <answers>.score.json
                         if args.score_file and args.score_file.endswith(SCORE_SUFFIX) else None)
            score_gqa(questions, predictions, args.score_file,
                      described if described and os.path.isfile(described) else None)
    except EvalInputError as e:
        print(f"score {args.benchmark}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
