"""GQA accuracy without GQA's eval.py: predictions against the answers in `<tier>_questions.json`.

Exact match after lower-casing and trimming (LLaVA's converter already lower-cases and drops a final
period). Questions without a prediction count as wrong, as GQA's own script would have them.
"""
from __future__ import annotations

from collections import defaultdict

from .convert.convert_gqa_for_eval import predictions_of
from .io import SCORE_SUFFIX, EvalInputError, read_json, read_jsonl, require_answers, score_path, write_score

PERCENT = 100.0


def _norm(text) -> str:
    return str(text).strip().lower()


def score_gqa(questions_file: str, predictions_file: str, score_file: str | None,
              answers_file: str | None = None) -> dict:
    """`answers_file`: the merged answers the predictions were converted from (the score file is theirs);
    the predictions must be exactly their conversion, since the score file records the answers' sha256."""
    questions = read_json(questions_file, "GQA questions file")
    predictions = read_json(predictions_file, "GQA predictions file")
    if answers_file is not None and predictions != predictions_of(read_jsonl(answers_file, "answers file")):
        raise EvalInputError(f"{predictions_file} is not the conversion of {answers_file} (another run's, or older "
                             f"answers): run convert_gqa_for_eval --src {answers_file} first")
    if not isinstance(questions, dict) or not isinstance(predictions, list):
        raise EvalInputError(f"expected {questions_file} to map question ids to questions and {predictions_file} "
                             f"to be a list of {{questionId, prediction}}")
    require_answers(predictions, predictions_file)
    if not questions:
        raise EvalInputError(f"GQA questions file {questions_file} holds no questions: nothing to score against")
    preds = {str(p["questionId"]): p["prediction"] for p in predictions}
    unknown = [q for q in preds if q not in questions]
    if unknown:
        raise EvalInputError(f"{predictions_file}: question ids {unknown[:5]} are not in {questions_file}")
    correct, by_type, missing = 0, defaultdict(lambda: [0, 0]), 0
    for qid, q in questions.items():
        if qid not in preds:
            missing += 1
        hit = qid in preds and _norm(preds[qid]) == _norm(q["answer"])
        correct += hit
        kind = (q.get("types") or {}).get("structural", "all")
        by_type[kind][0] += hit
        by_type[kind][1] += 1
    accuracy = PERCENT * correct / len(questions)
    per_type = {k: PERCENT * c / n for k, (c, n) in sorted(by_type.items())}
    for kind, acc in per_type.items():
        print(f"{kind}: {acc:.2f}%")
    if missing:
        print(f"warning: {missing} of {len(questions)} questions have no prediction (counted wrong)")
    print(f"Accuracy: {accuracy:.2f}%")
    return write_score(score_file or score_path(predictions_file), "gqa", "accuracy", accuracy, predictions_file,
                       details={"structural": per_type, "missing": missing}, num_samples=len(questions),
                       coverage={"scored": len(questions) - missing, "total": len(questions), "unit": "questions"})
