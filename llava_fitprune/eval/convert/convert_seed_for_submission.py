"""LLaVA's scripts/convert_seed_for_submission.py: SEED-Bench accuracy and upload file.

    python -m llava_fitprune.eval.convert.convert_seed_for_submission --annotation-file SEED-Bench.json \
        --result-file merge.jsonl --result-upload-file answers_upload/X.jsonl [--score-file merge.jsonl.score.json]

Prints accuracy per question type, then overall, image-only and video-only (an answer is right when
it is exactly the option letter). Writes {"question_id", "prediction"} per question, and a score
file whose headline is the image accuracy (SEED-IMG in the LLaVA-1.5 paper).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..io import EvalInputError, atomic_open, read_json, read_jsonl, require_answers, score_path, write_score

PERCENT = 100.0


def _qid(value):
    """SEED's ids are strings of digits; LLaVA's answers may hold them as ints."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def accuracy(questions: list[dict], results: dict, type_names: dict, data_type: str | None) -> dict:
    counts, correct = {}, {}
    for q in questions:
        if data_type is not None and q["data_type"] != data_type:
            continue
        t = q["question_type_id"]
        counts[t] = counts.get(t, 0) + 1
        row = results.get(_qid(q["question_id"]))
        correct[t] = correct.get(t, 0) + int(row is not None and row["text"] == q["answer"])
    total, right = sum(counts.values()), sum(correct.values())
    return {"accuracy": PERCENT * right / total if total else None, "count": total,
            "per_type": {type_names.get(t, str(t)): PERCENT * correct[t] / counts[t] for t in sorted(counts)}}


def convert(annotation_file: str, result_file: str, upload_file: str, score_file: str | None) -> dict:
    data = read_json(annotation_file, "SEED-Bench annotation file")
    type_names = {i: name for name, i in data["question_type"].items()}
    questions = data["questions"]
    rows = require_answers(read_jsonl(result_file, "answers file"), result_file)
    results = {_qid(r["question_id"]): r for r in rows}
    overall = accuracy(questions, results, type_names, None)
    for name, acc in overall["per_type"].items():
        print(f"{name}: {acc:.2f}%")
    print(f"Total accuracy: {overall['accuracy']:.2f}%")
    split = {}
    for kind in ("image", "video"):
        split[kind] = accuracy(questions, results, type_names, kind)
        shown = "n/a (no questions)" if split[kind]["accuracy"] is None else f"{split[kind]['accuracy']:.2f}%"
        print(f"{kind} accuracy: {shown}")
    missing = [q["question_id"] for q in questions if _qid(q["question_id"]) not in results]
    images = [q for q in questions if q["data_type"] == "image"]
    coverage = {"scored": sum(_qid(q["question_id"]) in results for q in images), "total": len(images),
                "unit": "image questions"}
    if missing:
        print(f"warning: {len(missing)} questions have no answer (counted wrong, uploaded empty), e.g. {missing[:5]}")
    os.makedirs(os.path.dirname(os.path.abspath(upload_file)), exist_ok=True)
    with atomic_open(upload_file) as f:
        for q in questions:
            row = results.get(_qid(q["question_id"]))
            f.write(json.dumps({"question_id": q["question_id"], "prediction": row["text"] if row else ""}) + "\n")
    details = {"accuracy": overall["accuracy"], "video_accuracy": split["video"]["accuracy"],
               "per_type": overall["per_type"], "missing": len(missing)}
    return write_score(score_file or score_path(result_file), "seed", "img_accuracy", split["image"]["accuracy"],
                       result_file, details=details, num_samples=overall["count"], coverage=coverage)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotation-file", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--result-upload-file", required=True)
    p.add_argument("--score-file", default=None, help="default: <result-file>.score.json")
    args = p.parse_args(argv)
    try:
        convert(args.annotation_file, args.result_file, args.result_upload_file, args.score_file)
    except EvalInputError as e:
        print(f"convert_seed_for_submission: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
