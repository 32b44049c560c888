"""ScienceQA: runs LLaVA's own `llava/eval/eval_science_qa.py`, then scores its output.

The headline is the accuracy on questions with an image (SQA-IMG, the LLaVA-1.5 paper's column);
the overall accuracy is kept in the details.
"""
from __future__ import annotations

import os

from .io import read_json, read_jsonl, require_answers, require_file, score_path, write_score
from .llava_files import run_llava_eval_script

PERCENT = 100.0


def run_llava_eval(base_dir: str, result_file: str, output_file: str, output_result: str, split: str) -> None:
    require_file(os.path.join(base_dir, "pid_splits.json"), "ScienceQA split file")
    require_file(os.path.join(base_dir, "problems.json"), "ScienceQA problems file")
    require_answers(read_jsonl(result_file, "answers file"), result_file)
    for path in (output_file, output_result):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    run_llava_eval_script("eval_science_qa", ["--base-dir", base_dir, "--result-file", result_file,
                                              "--output-file", output_file, "--output-result", output_result,
                                              "--split", split])


def score_sqa(base_dir: str, result_file: str, output_file: str, output_result: str, split: str,
              score_file: str | None) -> dict:
    run_llava_eval(base_dir, result_file, output_file, output_result, split)
    results = read_json(output_file, "ScienceQA output file")
    correct, incorrect = results["correct"], results["incorrect"]
    img_correct = sum(1 for x in correct if x["is_multimodal"])
    img_total = img_correct + sum(1 for x in incorrect if x["is_multimodal"])
    total = len(correct) + len(incorrect)
    img_acc = PERCENT * img_correct / img_total if img_total else 0.0
    split_ids = {str(i) for i in read_json(os.path.join(base_dir, "pid_splits.json"), "ScienceQA split file")[split]}
    answered = {str(r.get("question_id")) for r in read_jsonl(result_file, "answers file")} & split_ids
    return write_score(score_file or score_path(result_file), "sqa", "img_accuracy", img_acc, result_file,
                       details={"accuracy": PERCENT * len(correct) / total if total else 0.0,
                                "img_questions": img_total}, num_samples=total,
                       coverage={"scored": len(answered), "total": len(split_ids), "unit": "questions"})
