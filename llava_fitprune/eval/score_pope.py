"""POPE: LLaVA's yes/no rule and metrics (llava/eval/eval_pope.py), returning numbers as well as printing.

Labels pair with answers by order within each category, as in LLaVA; answers are put in
question-file order first, so a merged or resumed file scores the same.
"""
from __future__ import annotations

import os

from .io import EvalInputError, read_jsonl, require_answers, score_path, write_score

PERCENT = 100.0
PREFIX = "coco_pope_"
SUFFIX = ".json"


def yes_no(text: str) -> str:
    """LLaVA's rule: first sentence, commas dropped; 'No', 'not' or 'no' as a word means no."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def metrics(preds: list[str], labels: list[str]) -> dict:
    pairs = list(zip(preds, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l != "yes" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l != "no" for p, l in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / len(pairs) if pairs else 0.0,
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": preds.count("yes") / len(preds) if preds else 0.0}


def print_metrics(m: dict) -> None:
    print("TP\tFP\tTN\tFN\t")
    print("{}\t{}\t{}\t{}".format(m["TP"], m["FP"], m["TN"], m["FN"]))
    print("Accuracy: {}".format(m["accuracy"]))
    print("Precision: {}".format(m["precision"]))
    print("Recall: {}".format(m["recall"]))
    print("F1 score: {}".format(m["f1"]))
    print("Yes ratio: {}".format(m["yes_ratio"]))
    print("%.3f, %.3f, %.3f, %.3f, %.3f" % (m["f1"], m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]))


def score_pope(annotation_dir: str, question_file: str, result_file: str, score_file: str | None) -> dict:
    questions = read_jsonl(question_file, "POPE question file")
    order = {}
    for i, q in enumerate(questions):
        order.setdefault(q["question_id"], i)
    category = {q["question_id"]: q["category"] for q in questions}
    answers = require_answers(read_jsonl(result_file, "answers file"), result_file)
    unknown = [a["question_id"] for a in answers if a["question_id"] not in category]
    if unknown:
        raise EvalInputError(f"{result_file}: question ids {unknown[:5]} are not in {question_file}")
    answers.sort(key=lambda a: order[a["question_id"]])
    if not os.path.isdir(annotation_dir):
        raise EvalInputError(f"POPE annotation folder {annotation_dir} does not exist")
    files = sorted(f for f in os.listdir(annotation_dir) if f.startswith(PREFIX) and f.endswith(SUFFIX))
    if not files:
        raise EvalInputError(f"no {PREFIX}*{SUFFIX} label files in {annotation_dir}")
    per_category = {}
    for file in files:
        cat = file[len(PREFIX): -len(SUFFIX)]
        labels = [row["label"] for row in read_jsonl(os.path.join(annotation_dir, file), "POPE label file")]
        preds = [yes_no(a["text"]) for a in answers if category[a["question_id"]] == cat]
        if len(preds) != len(labels):
            raise EvalInputError(f"POPE {cat}: {len(preds)} answers but {len(labels)} labels in {file}; "
                                 f"is the answers file complete?")
        print("Category: {}, # samples: {}".format(cat, len(preds)))
        per_category[cat] = metrics(preds, ["no" if l == "no" else "yes" for l in labels])
        print_metrics(per_category[cat])
        print("====================================")
    mean_f1 = sum(m["f1"] for m in per_category.values()) / len(per_category)
    mean_acc = sum(m["accuracy"] for m in per_category.values()) / len(per_category)
    print(f"POPE mean F1 over {len(per_category)} categories: {PERCENT * mean_f1:.2f}, "
          f"mean accuracy {PERCENT * mean_acc:.2f}")
    return write_score(score_file or score_path(result_file), "pope", "f1", PERCENT * mean_f1, result_file,
                       details={"accuracy": PERCENT * mean_acc, "categories": per_category},
                       num_samples=len(answers),
                       coverage={"scored": len(answers), "total": len(questions), "unit": "questions"})
