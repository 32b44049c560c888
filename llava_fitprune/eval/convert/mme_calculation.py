"""MME's eval_tool/calculation.py (which LLaVA's mme.sh runs): per-task and total MME scores.

    python -m llava_fitprune.eval.convert.mme_calculation --results_dir eval_tool/answers/X [--score-file F]

A task scores 100 x accuracy (per question) + 100 x accuracy+ (per image: all its questions right);
Perception sums its 10 tasks (max 2000), Cognition its 4 (max 800). An answer counts as yes/no when
it is exactly that or its first four characters contain it, as in MME's tool. Tasks with no result
file are reported missing (MME's tool would stop). The score file's headline is Perception.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..io import EvalInputError, write_score

EVAL_TYPES = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
PERCENT = 100.0
PREFIX_CHARS = 4  # MME looks for yes/no in the first four characters


def parse_pred(pred: str) -> str:
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:PREFIX_CHARS]
    return "yes" if "yes" in prefix else ("no" if "no" in prefix else "other")


def task_score(path: str) -> dict:
    by_image: dict[str, list[bool]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                raise EvalInputError(f"{path} line {lineno}: expected 4 tab-separated columns, got {len(parts)}")
            image, _, gt, pred = parts
            if gt.lower() not in ("yes", "no"):
                raise EvalInputError(f"{path} line {lineno}: ground truth {gt!r} is not yes/no")
            by_image.setdefault(image, []).append(parse_pred(pred.lower()) == gt.lower())
    answers = [ok for oks in by_image.values() for ok in oks]
    acc = sum(answers) / len(answers) if answers else 0.0
    acc_plus = sum(all(oks) for oks in by_image.values()) / len(by_image) if by_image else 0.0
    return {"acc": PERCENT * acc, "acc_plus": PERCENT * acc_plus, "score": PERCENT * (acc + acc_plus),
            "questions": len(answers), "images": len(by_image)}


def calculate(results_dir: str) -> dict:
    if not os.path.isdir(results_dir):
        raise EvalInputError(f"MME results folder {results_dir} does not exist (run convert_mme first)")
    out = {}
    for eval_type, tasks in EVAL_TYPES.items():
        scores = {t: task_score(os.path.join(results_dir, f"{t}.txt")) for t in tasks
                  if os.path.exists(os.path.join(results_dir, f"{t}.txt"))}
        out[eval_type] = {"total": sum(s["score"] for s in scores.values()), "tasks": scores,
                          "missing": [t for t in tasks if t not in scores]}
        print("===========", eval_type, "===========")
        print("total score:", out[eval_type]["total"], "\n")
        for task, s in scores.items():
            print("\t", task, " score:", s["score"])
        if out[eval_type]["missing"]:
            print("\t missing tasks:", ", ".join(out[eval_type]["missing"]))
        print("\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", required=True)
    p.add_argument("--score-file", default=None, help="write the scores here for `llava-fitprune report`")
    p.add_argument("--answers-file", default=None, help="the answers these results came from (recorded)")
    args = p.parse_args(argv)
    try:
        out = calculate(args.results_dir)
    except EvalInputError as e:
        print(f"mme_calculation: {e}", file=sys.stderr)
        return 1
    if args.score_file:
        questions = sum(s["questions"] for t in out.values() for s in t["tasks"].values())
        perception = EVAL_TYPES["Perception"]
        write_score(args.score_file, "mme", "perception", out["Perception"]["total"], args.answers_file,
                    details={"cognition": out["Cognition"]["total"], **out}, num_samples=questions,
                    coverage={"scored": len(perception) - len(out["Perception"]["missing"]), "total": len(perception),
                              "unit": "perception tasks"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
