"""The report's benchmarks: the paper's column order, each one's headline metric and its scale.

Shared by the report (`report*.py`) and the score writers (`score_import.py`), so that neither imports
the other.
"""
from __future__ import annotations

from dataclasses import dataclass

from .convert.mme_calculation import EVAL_TYPES, PERCENT

# MME scores a task 100 x accuracy + 100 x accuracy+; its headline, Perception, sums its tasks.
MME_TASK_MAX = 2 * PERCENT
MME_PERCEPTION_MAX = len(EVAL_TYPES["Perception"]) * MME_TASK_MAX


@dataclass(frozen=True)
class Benchmark:
    key: str  # the merge's --benchmark, the score file's "benchmark"
    heading: str  # the table's column heading (LLaVA-1.5's paper)
    metric: str  # the score file's "metric" for the headline
    max_score: float | None  # the headline's top (None: open-ended, e.g. LLaVA-W's ratio to GPT-4)
    local: bool  # scored by the scripts themselves (else: a server or GPT-4 grader scores the answers)


BENCHMARKS_INFO = [
    Benchmark("vqav2", "VQAv2", "accuracy", PERCENT, False),
    Benchmark("gqa", "GQA", "accuracy", PERCENT, True),
    Benchmark("vizwiz", "VizWiz", "accuracy", PERCENT, False),
    Benchmark("sqa", "SQA-IMG", "img_accuracy", PERCENT, True),
    Benchmark("textvqa", "TextVQA", "accuracy", PERCENT, True),
    Benchmark("pope", "POPE", "f1", PERCENT, True),
    Benchmark("mme", "MME", "perception", MME_PERCEPTION_MAX, True),
    Benchmark("mmbench", "MMB", "accuracy", PERCENT, False),
    Benchmark("mmbench_cn", "MMB-CN", "accuracy", PERCENT, False),
    Benchmark("seed", "SEED-IMG", "img_accuracy", PERCENT, True),
    Benchmark("llavabench", "LLaVA-W", "relative_score", None, False),
    Benchmark("mmvet", "MM-Vet", "gpt4_score", PERCENT, False),
]
BY_KEY = {b.key: b for b in BENCHMARKS_INFO}
# (key, heading) in the paper's column order
BENCHMARKS = [(b.key, b.heading) for b in BENCHMARKS_INFO]
LOCALLY_SCORED = {b.key for b in BENCHMARKS_INFO if b.local}


def percent_of_max(key: str, score: float) -> float:
    """A score on a 0-100 scale, for averaging across benchmarks (MME: percent of its 2000 maximum)."""
    bench = BY_KEY.get(key)
    if bench is None or bench.max_score in (None, PERCENT):
        return score
    return PERCENT * score / bench.max_score
