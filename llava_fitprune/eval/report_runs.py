"""The report's inputs: finished merged runs under a folder, and whether each score may be shown.

A score is shown only while it describes the answers as they are: the score file records the sha256
of the answers it was computed from (`io.write_score`), and the answers' sidecar records the sha256 of
the question file they answer. Otherwise the cell says `stale` or `failed`, and a note says why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .args import LOADER_MAX_NEW_TOKENS, LONG_MAX_NEW_TOKENS
from .benchmarks import LOCALLY_SCORED
from .io import EvalInputError, file_sha256, read_json, score_path

OK = "ok"
NO_LOCAL_SCORE = "sub"  # answers are ready for the benchmark's server or GPT grader
LOCAL_SCORE_FAILED = "failed"  # the script scores it locally, but no score of these answers is there
STALE = "stale"  # a score is there, but of other answers or of an edited question file
# Each eval module's own max_new_tokens default (args.py): one script run mixes them, so they are one run.
DEFAULT_MAX_NEW_TOKENS = {"model_vqa_loader": LOADER_MAX_NEW_TOKENS, "model_vqa": LONG_MAX_NEW_TOKENS,
                          "model_vqa_science": LONG_MAX_NEW_TOKENS, "model_vqa_mmbench": LONG_MAX_NEW_TOKENS}


@dataclass
class Run:
    meta: dict
    answers_file: str
    score: dict | None
    answers_sha256: str | None = None
    status: str = OK
    note: str | None = None
    question_file_checked: bool = field(default=True)

    @property
    def benchmark(self) -> str:
        return self.meta.get("benchmark") or "unknown"

    @property
    def method(self) -> str:
        return self.meta.get("method", "fitprune") if self.meta.get("recipe") else "dense"

    @property
    def model(self) -> str:
        return self.meta.get("model_name", "?")

    @property
    def run_name(self) -> str:
        """The scripts' CKPT: recorded by the merge, else read off LLaVA's layout (<CKPT>.jsonl, <CKPT>/merge.jsonl)."""
        if self.meta.get("run_name"):
            return self.meta["run_name"]
        stem = os.path.splitext(os.path.basename(self.answers_file))[0]
        return os.path.basename(os.path.dirname(self.answers_file)) if stem == "merge" else stem

    @property
    def budget(self) -> str:
        """What set the amount pruned: the --reduction-ratio flag, the recipe file, the method's own options."""
        recipe = self.meta.get("recipe")
        if not recipe:
            return "0"
        if self.meta.get("reduction_ratio") is not None:
            return f"{self.meta['reduction_ratio']:g}"
        if recipe.get("reduction_ratio") is not None:  # a FitPrune recipe made for a ratio
            return f"{recipe['reduction_ratio']:g}"
        if self.meta.get("recipe_file"):
            return os.path.basename(self.meta["recipe_file"])
        provenance = recipe.get("provenance") or {}
        if "fastv_k" in provenance:
            return f"K={provenance['fastv_k']} R={provenance['fastv_r']:g}"
        return str(self.meta.get("recipe_fingerprint"))

    @property
    def max_new_tokens(self):
        """None where the module's own default ran (modules differ: 128 for short answers, 1024 else)."""
        value = self.meta.get("max_new_tokens")
        return None if value == DEFAULT_MAX_NEW_TOKENS.get(self.meta.get("module")) else value

    @property
    def settings(self) -> str:
        """What changes the answers besides model and pruning: template, batch, max_new_tokens where not
        the module's default, attention kernel, dtype, and the compiled fast path."""
        m = self.meta
        parts = [f"{m.get('conv_mode')}, batch {m.get('batch_size')}"]
        if self.max_new_tokens is not None:
            parts.append(f"max_new_tokens {self.max_new_tokens}")
        parts += [str(m[k]) for k in ("attn_implementation", "dtype") if m.get(k)]
        if m.get("compile"):
            parts.append("compiled")
        return ", ".join(parts)

    @property
    def row_key(self) -> tuple:
        return (self.run_name, self.model, self.method, self.budget, self.meta.get("recipe_fingerprint"),
                self.settings)

    @property
    def num_chunks(self) -> int:
        return int(self.meta.get("num_chunks") or 1)

    def prefill(self, key: str):
        return (self.meta.get("prefill") or {}).get(key)

    @property
    def shown_score(self) -> float | None:
        return self.score["score"] if self.status == OK else None

    @property
    def coverage(self) -> dict | None:
        cov = (self.score or {}).get("coverage") if self.status == OK else None
        return cov if isinstance(cov, dict) and cov.get("total") else None

    @property
    def partial(self) -> bool:
        return self.coverage is not None and self.coverage["scored"] < self.coverage["total"]


def locate(path: str, answers_file: str) -> str | None:
    """A path the eval module was given, relative to the folder the script ran in: tried from here, then
    from each folder above the answers (the scripts run from the repository root)."""
    path = os.path.expanduser(path)
    if os.path.isabs(path) or os.path.isfile(path):
        return path if os.path.isfile(path) else None
    folder = os.path.dirname(os.path.abspath(answers_file))
    while True:
        candidate = os.path.join(folder, path)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_score(run: Run) -> None:
    """Sets `run.status` and `run.note`: ok only when the score describes these answers, of this question file."""
    local = run.benchmark in LOCALLY_SCORED
    missing = LOCAL_SCORE_FAILED if local else NO_LOCAL_SCORE
    qfile, qsha = run.meta.get("question_file"), run.meta.get("question_file_sha256")
    qpath = locate(qfile, run.answers_file) if qfile else None
    if qpath and qsha:
        now = file_sha256(qpath)
        if now != qsha:
            run.status, run.note = STALE, (
                f"{run.run_name} {run.benchmark}: the question file {qfile} changed since these answers were "
                f"generated (sha256 {qsha[:12]} -> {now[:12]}): delete {run.answers_file} and its chunks, rerun "
                f"the script")
            return
    elif qfile and qsha:
        run.question_file_checked = False
    score = run.score
    if score is None or score.get("score") is None:
        run.status = missing
        if local:
            run.note = (f"{run.run_name} {run.benchmark}: no score of these answers: the local scorer failed or did "
                        f"not run (see the script's output; rerun its score step)")
        return
    recorded = score.get("answers_sha256")
    if recorded is None:
        run.status, run.note = STALE, (
            f"{run.run_name} {run.benchmark}: its score file records no answers sha256 (written before score "
            f"format 2), so it cannot be tied to these answers: rerun the score step, or set it again")
        return
    if recorded != run.answers_sha256:
        how = ("the scorer failed or did not run after the latest merge (see the script's output; rerun its score "
               "step)" if local else "resubmit these answers and set or import the new score")
        run.status = LOCAL_SCORE_FAILED if local else STALE
        run.note = (f"{run.run_name} {run.benchmark}: the score file is of other answers (sha256 {recorded[:12]}, "
                    f"the answers now {run.answers_sha256[:12]}): {how}")
        return
    run.status, run.note = OK, None


def find_runs(root: str) -> tuple[list[Run], list[str]]:
    """Finished merged runs under `root`, each with its score checked, and notes about what was skipped."""
    runs, notes = [], []
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".meta.json"):
                continue
            path = os.path.join(folder, name)
            try:
                meta = read_json(path, "eval sidecar")
            except ValueError as e:
                notes.append(f"skipped {path}: {e}")
                continue
            if not isinstance(meta, dict) or meta.get("format") != "llava-fitprune.eval-meta" or meta.get("kind") != "merged":
                continue
            answers = path[: -len(".meta.json")]
            if not meta.get("complete"):
                notes.append(f"skipped {answers}: not complete (rerun its script)")
                continue
            if not os.path.isfile(answers):
                notes.append(f"skipped {answers}: its sidecar is there but the answers are not (rerun its script)")
                continue
            spath = score_path(answers)
            try:
                score = read_json(spath, "score file") if os.path.exists(spath) else None
            except EvalInputError as e:
                score, _ = None, notes.append(f"ignored {spath}: {e}")
            run = Run(meta, answers, score if isinstance(score, dict) else None, file_sha256(answers))
            check_score(run)
            runs.append(run)
    unchecked = sum(not r.question_file_checked for r in runs)
    if unchecked:
        notes.append(f"{unchecked} run(s)' question files are not where their sidecars say (run the report from "
                     f"the folder the scripts ran in): those answers were not checked against their question file")
    return runs, notes


def latest_per_cell(runs: list[Run], notes: list[str] | None = None) -> dict:
    """{row_key: {benchmark: run}}, one row per distinct run; should one run have two merged files for
    a benchmark (e.g. moved folders), the later merge is shown and `notes` says so."""
    table: dict = {}
    for run in sorted(runs, key=lambda r: r.meta.get("merged_at", "")):
        cells = table.setdefault(run.row_key, {})
        if run.benchmark in cells and notes is not None:
            notes.append(f"{run.run_name} {run.benchmark}: {cells[run.benchmark].answers_file} is superseded by "
                         f"the later {run.answers_file}")
        cells[run.benchmark] = run
    return table
