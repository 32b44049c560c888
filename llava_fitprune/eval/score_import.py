"""Server and GPT-4 scores into the report: `report --set-score RUN BENCH VALUE` and
`report --import-score RUN BENCH FILE`, written as the answers' score file (docs/report.md).

Importers read each grader's own result file:
  vqav2, vizwiz         EvalAI's "Result file": [{"test-dev": {"overall": 78.5, "yes/no": ...}}, ...]
  mmbench, mmbench_cn   the evaluation's accuracy table (.csv or .xlsx) with an "Overall" column
  mmvet                 MM-Vet's evaluator output: *-cap-score-*runs.csv ("total") or *-grade-*runs.json
  llavabench            LLaVA's eval_gpt_review_bench.py reviews (.jsonl): the relative score of "all"
Every check runs before anything is written; a bad input raises `EvalInputError` with one line.
"""
from __future__ import annotations

import csv
import math
import os

from .benchmarks import BY_KEY
from .io import EvalInputError, file_sha256, read_json, read_jsonl, write_score

PERCENT = 100.0
EVALAI_PHASE = "test-dev"  # LLaVA-1.5's VQAv2 and VizWiz columns are test-dev
EVALAI_HEADLINE = "overall"
MMBENCH_HEADLINE = "Overall"
MMBENCH_SPLIT = "dev"  # LLaVA's mmbench scripts answer the dev split
MMVET_HEADLINE = "total"
MMVET_ID_PREFIX = "v1_"  # convert_mmvet_for_eval names answers v1_<question_id>
LLAVABENCH_ALL = "all"
ROUND_DIGITS = 3  # summarize_gpt_review.py rounds the mean scores to 3 digits before the ratio


def parse_value(bench: str, text: str) -> float:
    """A finite number within the benchmark's scale."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise EvalInputError(f"score {text!r} for {bench} is not a number: give e.g. 78.5") from None
    if not math.isfinite(value):
        raise EvalInputError(f"score {text!r} for {bench} is not a finite number")
    top = BY_KEY[bench].max_score
    if value < 0 or (top is not None and value > top):
        scale = f"0 to {top:g}" if top is not None else ">= 0"
        raise EvalInputError(f"score {value:g} for {bench} is outside its scale ({scale}, "
                             f"{BY_KEY[bench].metric}); give it in percent, as the paper's table does")
    return value


def _evalai(path: str, answers: list[dict]) -> tuple[float, dict, dict | None]:
    data = read_json(path, "EvalAI result file")
    phases = {}
    for entry in data if isinstance(data, list) else [data]:
        if isinstance(entry, dict):
            phases.update({k: v for k, v in entry.items() if isinstance(v, dict)})
    if not phases:
        raise EvalInputError(f"EvalAI result file {path} holds no phase: expected "
                             f'[{{"{EVALAI_PHASE}": {{"{EVALAI_HEADLINE}": 78.5, ...}}}}] (the submission\'s "Result file")')
    phase = EVALAI_PHASE if EVALAI_PHASE in phases else (next(iter(phases)) if len(phases) == 1 else None)
    if phase is None:
        raise EvalInputError(f"EvalAI result file {path} has phases {sorted(phases)} but no {EVALAI_PHASE}: "
                             f"keep only the phase to report, or use --set-score")
    if EVALAI_HEADLINE not in phases[phase]:
        raise EvalInputError(f"EvalAI result file {path}, phase {phase}, has no {EVALAI_HEADLINE!r} "
                             f"(has {sorted(phases[phase])})")
    return phases[phase][EVALAI_HEADLINE], {"phase": phase, **phases[phase]}, None


def _table_rows(path: str) -> list[dict]:
    if path.lower().endswith(".xlsx"):
        from .convert.xlsx import read_xlsx

        try:
            return read_xlsx(path)
        except (OSError, KeyError, ValueError) as e:
            raise EvalInputError(f"{path} is not a readable .xlsx sheet ({e}): save it as .csv") from None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalInputError(f"{path} is not a readable .csv table ({e})") from None


def _mmbench(path: str, answers: list[dict]) -> tuple[float, dict, dict | None]:
    rows = [r for r in _table_rows(path) if r.get(MMBENCH_HEADLINE) not in (None, "")]
    if not rows:
        raise EvalInputError(f"{path} has no {MMBENCH_HEADLINE!r} column with a value: expected MMBench's "
                             f"accuracy table (split, {MMBENCH_HEADLINE}, categories...)")
    if len(rows) > 1:
        rows = [r for r in rows if str(r.get("split", "")).lower() == MMBENCH_SPLIT] or rows
    if len(rows) > 1:
        raise EvalInputError(f"{path} has {len(rows)} rows with {MMBENCH_HEADLINE!r} and none says split "
                             f"{MMBENCH_SPLIT!r}: keep the row to report, or use --set-score")
    value = float(rows[0][MMBENCH_HEADLINE])
    details = {k: v for k, v in rows[0].items() if k}
    if value <= 1.0:  # VLMEvalKit writes fractions
        value, details["converted_from_fraction"] = PERCENT * value, True
    return value, details, None


def _ids_coverage(ids: set, answers: list[dict], path: str, what: str) -> dict:
    asked = {str(a.get("question_id")) for a in answers}
    unknown = sorted(ids - asked)
    if unknown:
        raise EvalInputError(f"{path}: {what} {unknown[:5]} are not in the run's answers: this file grades "
                             f"other answers (another run, or answers since regenerated)")
    return {"scored": len(ids), "total": len(asked), "unit": "questions"}


def _mmvet(path: str, answers: list[dict]) -> tuple[float, dict, dict | None]:
    if path.lower().endswith(".json"):  # the grade file: {"v1_0": {"score": [run scores]}, ...}
        grades = read_json(path, "MM-Vet grade file")
        if not isinstance(grades, dict) or not grades or not all(
                isinstance(g, dict) and g.get("score") for g in grades.values()):
            raise EvalInputError(f"{path} is not MM-Vet's grade file ({{\"v1_0\": {{\"score\": [0.5]}}, ...}})")
        runs = min(len(g["score"]) for g in grades.values())
        totals = [PERCENT * sum(g["score"][i] for g in grades.values()) / len(grades) for i in range(runs)]
        ids = {k[len(MMVET_ID_PREFIX):] if k.startswith(MMVET_ID_PREFIX) else k for k in grades}
        coverage = _ids_coverage(ids, answers, path, "question ids")
        return sum(totals) / runs, {"runs": totals}, coverage
    rows = [r for r in _table_rows(path) if r.get(MMVET_HEADLINE) not in (None, "")]
    if len(rows) != 1:
        raise EvalInputError(f"{path}: expected MM-Vet's cap-score table with one row and a {MMVET_HEADLINE!r} "
                             f"column, found {len(rows)} such rows")
    return float(rows[0][MMVET_HEADLINE]), {k: v for k, v in rows[0].items() if k}, None


def _llavabench(path: str, answers: list[dict]) -> tuple[float, dict, dict | None]:
    # The arithmetic of LLaVA's llava/eval/summarize_gpt_review.py (LLaVA 1.2.2): each review's "tuple" is
    # [GPT-4's answer score, the model's]; relative score = mean(model) / mean(GPT-4) * 100 over "all".
    reviews = read_jsonl(path, "LLaVA-Bench review file")
    pairs = [r.get("tuple") for r in reviews]
    if not reviews or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise EvalInputError(f"{path} is not a review file of eval_gpt_review_bench.py (each line needs "
                             f"\"tuple\": [gpt4_score, model_score])")
    means = [round(sum(p[i] for p in pairs) / len(pairs), ROUND_DIGITS) for i in range(2)]
    if means[0] <= 0:
        raise EvalInputError(f"{path}: GPT-4's mean score is {means[0]}, so no relative score exists")
    coverage = _ids_coverage({str(r.get("question_id")) for r in reviews}, answers, path, "question ids")
    unparsed = sum(1 for p in pairs if p == [-1, -1])  # the reviewer's "could not parse" mark
    return (PERCENT * means[1] / means[0], {"gpt4_mean": means[0], "model_mean": means[1],
                                             "unparsed_reviews": unparsed, "category": LLAVABENCH_ALL}, coverage)


IMPORTERS = {"vqav2": _evalai, "vizwiz": _evalai, "mmbench": _mmbench, "mmbench_cn": _mmbench,
             "mmvet": _mmvet, "llavabench": _llavabench}


def check_importer(bench: str) -> None:
    if bench in BY_KEY and bench not in IMPORTERS:
        raise EvalInputError(f"no importer for {bench}: importers exist for {', '.join(IMPORTERS)}; "
                             f"use --set-score RUN {bench} VALUE")


def import_score(bench: str, path: str, answers_file: str) -> tuple[float, dict, dict | None]:
    check_importer(bench)
    if not os.path.isfile(path):
        raise EvalInputError(f"result file {path} does not exist")
    answers = read_jsonl(answers_file, "answers file")
    value, details, coverage = IMPORTERS[bench](path, answers)
    try:
        return parse_value(bench, str(value)), details, coverage
    except EvalInputError as e:
        raise EvalInputError(f"{path}: {e}") from None


def set_score(bench: str, value: float, answers_file: str, source: dict, details: dict | None = None,
              coverage: dict | None = None) -> dict:
    """The score file of `answers_file` (atomic write), tied to the answers' sha256."""
    if source.get("file"):
        source = dict(source, file_sha256=file_sha256(source["file"]))
    return write_score(f"{answers_file}.score.json", bench, BY_KEY[bench].metric, value, answers_file,
                       details=details, coverage=coverage, source=source)
