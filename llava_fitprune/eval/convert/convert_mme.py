"""MME's convert_answer_to_mme.py (shipped in LLaVA's eval data): answers -> MME's per-category files.

    cd playground/data/eval/MME && python -m llava_fitprune.eval.convert.convert_mme --experiment X
    # or from anywhere: --data-dir playground/data/eval/MME

Reads <data-dir>/answers/<experiment>.jsonl and the ground truth in
<data-dir>/MME_Benchmark_release_version/<category>/ (either images/ + questions_answers_YN/, or
images next to their .txt), and writes <data-dir>/eval_tool/answers/<experiment>/<category>.txt with
"image.txt<TAB>question<TAB>truth<TAB>answer" lines, the input of MME's calculation
(`python -m llava_fitprune.eval.convert.mme_calculation --results_dir ...`).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from ..io import EvalInputError, atomic_open, read_jsonl, require_answers

BENCH_DIR = "MME_Benchmark_release_version"
SHORT_PROMPT = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def get_gt(bench_dir: str) -> dict:
    """{(category, 'image.txt', question): 'Yes'|'No'} from MME's question files."""
    if not os.path.isdir(bench_dir):
        raise EvalInputError(f"MME benchmark folder {bench_dir} does not exist")
    gt = {}
    for category in sorted(os.listdir(bench_dir)):
        category_dir = os.path.join(bench_dir, category)
        if not os.path.isdir(category_dir):
            continue
        nested = os.path.isdir(os.path.join(category_dir, "images"))
        qa_dir = os.path.join(category_dir, "questions_answers_YN") if nested else category_dir
        if not os.path.isdir(qa_dir):
            raise EvalInputError(f"MME category {category} has images/ but no {qa_dir}")
        for file in os.listdir(qa_dir):
            if not file.endswith(".txt"):
                continue
            with open(os.path.join(qa_dir, file), encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise EvalInputError(f"{os.path.join(qa_dir, file)} line {lineno}: expected "
                                             f"'question<TAB>answer'")
                    gt[(category, file, parts[0])] = parts[1]
    return gt


def mme_prompt(prompt: str, category: str, file: str, gt: dict) -> str:
    """LLaVA's prompt -> MME's question text (its files are inconsistent about one or two spaces)."""
    if SHORT_PROMPT in prompt:
        prompt = prompt.replace(SHORT_PROMPT, "").strip()
    if YES_NO not in prompt:
        prompt = prompt + " " + YES_NO
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(" " + YES_NO, "  " + YES_NO)
    return prompt


def convert(data_dir: str, experiment: str) -> dict:
    gt = get_gt(os.path.join(data_dir, BENCH_DIR))
    answers_file = os.path.join(data_dir, "answers", f"{experiment}.jsonl")
    answers = require_answers(read_jsonl(answers_file, "answers file"), answers_file)
    results = defaultdict(list)
    for a in answers:
        category = a["question_id"].split("/")[0]
        file = a["question_id"].split("/")[-1].split(".")[0] + ".txt"
        prompt = mme_prompt(a["prompt"], category, file, gt)
        if (category, file, prompt) not in gt:
            raise EvalInputError(f"no MME ground truth for {category}/{file} question {prompt!r}")
        answer = a["text"].replace("\t", " ").replace("\r", " ").replace("\n", " ")  # keep MME's columns
        results[category].append((file, prompt, gt[(category, file, prompt)], answer))
    out_dir = os.path.join(data_dir, "eval_tool", "answers", experiment)
    os.makedirs(out_dir, exist_ok=True)
    for category, rows in results.items():
        with atomic_open(os.path.join(out_dir, f"{category}.txt")) as f:
            f.writelines("\t".join(row) + "\n" for row in rows)
    return {"results_dir": out_dir, "categories": sorted(results), "answers": len(answers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="answers/<experiment>.jsonl")
    p.add_argument("--data-dir", default=".", help="the MME folder (default: the current directory, as LLaVA)")
    args = p.parse_args(argv)
    try:
        out = convert(args.data_dir, args.experiment)
    except EvalInputError as e:
        print(f"convert_mme: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(out['categories'])} categories ({out['answers']} answers) to {out['results_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
