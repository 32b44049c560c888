"""Table, CSV, versioned JSON, plot and FitPrune-vs-baselines comparison of `llava-fitprune accuracy`."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os

import torch

from ..utils import atomic
from ..core.flops import LMShape
from .questions import QUESTION_TYPES

FORMAT, VERSION = "llava-fitprune-accuracy", 1
CONVENTION = ("language-model prefill FLOPs, 'total' convention (every prefill token, 2 x MACs of the matmuls; "
              "llava_fitprune.core.flops) - the convention build_method matches budgets under")
METHOD_ORDER = ("dense", "fitprune", "random", "uniform", "fastv", "lvprune")
STAGED = "fitprune-k"  # fitprune-kK: FitPrune fitted with at most K pruning layers


def method_rank(method: str) -> tuple:
    """Table order: METHOD_ORDER, with fitprune-kK after fitprune by K."""
    if method.startswith(STAGED):
        return METHOD_ORDER.index("fitprune"), int(method[len(STAGED):])
    return METHOD_ORDER.index(method), 0
FIELDS = ["method", "ratio", "status", "achieved_reduction", "prefill_tflops", "accuracy", "correct", "n",
          *QUESTION_TYPES, "seconds", "drop_per_layer", "reason"]


def model_shape(model) -> LMShape:
    return LMShape.from_config(model.config)


def row(method, ratio, recipe, counts: dict, flops: list, seconds: float) -> dict:
    """One scored run. counts: {category: [correct, total]}; flops: a MethodFlops per question."""
    total, dense = sum(f.total for f in flops), sum(f.dense for f in flops)
    correct, n = counts["overall"]
    return {"method": method, "ratio": ratio, "status": "ok", "achieved_reduction": round(1 - total / dense, 6),
            "prefill_tflops": total / len(flops) / 1e12, "dense_tflops": dense / len(flops) / 1e12,
            "accuracy": correct / n, "correct": correct, "n": n,
            "per_category": {k: {"correct": c, "total": t, "accuracy": c / t} for k, (c, t) in sorted(counts.items())
                             if k != "overall"},
            "seconds": round(seconds, 2), "drop_per_layer": recipe.drop_per_layer if recipe else None,
            "recipe_fingerprint": recipe.fingerprint() if recipe else None}


def _sha256(path: str):
    if not os.path.isfile(path) or os.path.getsize(path) > 1 << 30:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(args, split, seed, seed_source, num_questions, max_new, n_text, n_visual, calib_meta) -> dict:
    import transformers

    from .. import __version__

    meta = os.path.join(split, "meta.json")
    split_seed = json.load(open(meta)).get("seed") if os.path.isfile(meta) else None
    return {"checkpoint": os.path.abspath(args.checkpoint),
            "model_sha256": _sha256(os.path.join(args.checkpoint, "model.safetensors")),
            "split": os.path.abspath(split), "split_given": args.split is not None, "split_seed": split_seed,
            "data_seed": seed, "data_seed_source": seed_source, "num_questions": num_questions, "limit": args.limit,
            "max_new_tokens": max_new, "batch_size": args.batch_size, "conv_mode": args.conv_mode,
            "flops_convention": "total", "ratio_convention": args.convention,
            "max_pruning_layers": getattr(args, "max_pruning_layers", []), "reference_text_tokens": n_text, "visual_tokens": n_visual,
            "calibration": calib_meta, "torch": torch.__version__, "transformers": transformers.__version__,
            "package_version": __version__, "threads": torch.get_num_threads()}


def _ordered(results, skipped) -> list[dict]:
    na = [{"method": m, "ratio": r, "status": "n/a", "reason": why} for m, r, why in skipped]
    key = lambda x: (x["ratio"] if x["ratio"] is not None else 2.0, method_rank(x["method"]))  # noqa: E731
    return sorted(results + na, key=key)


def _cells(x: dict) -> dict:
    ratio = "-" if x["ratio"] is None else f"{x['ratio']:g}"
    if x["status"] != "ok":
        return {"method": x["method"], "ratio": ratio, "status": "n/a", "reason": x["reason"]}
    cats = {k: f"{v['accuracy']:.3f}" for k, v in x["per_category"].items()}
    return {"method": x["method"], "ratio": ratio, "status": "ok",
            "achieved_reduction": f"{x['achieved_reduction']:.3f}", "prefill_tflops": f"{x['prefill_tflops']:.6f}",
            "accuracy": f"{x['accuracy']:.3f}",
            "correct": x["correct"], "n": x["n"], **{k: cats.get(k, "") for k in QUESTION_TYPES},
            "seconds": x["seconds"], "drop_per_layer": " ".join(map(str, x["drop_per_layer"] or [])), "reason": ""}


def markdown(rows: list[dict], prov: dict) -> str:
    heads = ["method", "ratio", "achieved reduction", "prefill TFLOPs / question", "accuracy", *QUESTION_TYPES,
             "n", "s"]
    out = [f"Accuracy on {prov['num_questions']} synthetic test questions ({prov['split']}), checkpoint "
           f"{prov['checkpoint']}. FLOPs: {CONVENTION}; methods at one ratio are matched at a reference prompt of "
           f"{prov['reference_text_tokens']} text + {prov['visual_tokens']} visual tokens; 'achieved reduction' is "
           f"measured over the questions' own prompts. Greedy answers, at most {prov['max_new_tokens']} new tokens, "
           f"exact match. s: wall seconds for the run.", "",
           "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for c in map(_cells, rows):
        if c["status"] != "ok":
            out.append(f"| {c['method']} | {c['ratio']} | n/a: {c['reason']} |" + " |" * (len(heads) - 3))
            continue
        vals = [c["method"], c["ratio"], c["achieved_reduction"], c["prefill_tflops"], c["accuracy"],
                *(c[k] for k in QUESTION_TYPES), str(c["n"]), f"{c['seconds']:.1f}"]
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def plot(results: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.plots import finish

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({x["method"] for x in results} - {"dense"}, key=method_rank):
        pts = sorted((x["prefill_tflops"], x["accuracy"]) for x in results if x["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    for x in results:
        if x["method"] == "dense":
            ax.plot(x["prefill_tflops"], x["accuracy"], marker="*", markersize=14, color="black", ls="", label="dense")
    ax.set_xlabel("prefill TFLOPs / question ('total' convention)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("synthetic VQA: accuracy at equal FLOPs")
    return finish(fig, ax, path)


def paired_difference(ours: dict, theirs: dict) -> str:
    """Accuracy of `ours` minus `theirs` ({question_id: correct}), paired on ours' questions: the mean of
    per-question differences (+1, 0, -1), its standard error, questions ours alone got right / wrong."""
    other = [theirs.get(q) for q in ours]
    if not ours or any(o is None for o in other):
        return "n/a"
    d = [int(f) - int(o) for f, o in zip(ours.values(), other)]  # per question: +1 won, -1 lost
    n, mean = len(d), sum(d) / len(d)
    se = math.sqrt(max(sum(x * x for x in d) / n - mean ** 2, 0.0) / (n - 1)) if n > 1 else math.nan
    return f"{mean:+.3f} (+-{se:.3f}; {d.count(1)} won, {d.count(-1)} lost)"


def comparison(results: list[dict], preds: list[dict], min_ratio: float = 0.6) -> str:
    """FitPrune's accuracy minus random's and uniform's at each ratio >= min_ratio, paired on the same
    questions (`paired_difference`); and, where run, each fitprune-kK minus fitprune at every ratio."""
    correct = {(p["method"], p["ratio"], p["question_id"]): bool(p["correct"]) for p in preds}
    answers = lambda m, r: {q: c for (mm, rr, q), c in correct.items() if mm == m and rr == r}  # noqa: E731
    ratios = sorted({x["ratio"] for x in results if x["method"] == "fitprune" and x.get("ratio") is not None
                     and x["ratio"] >= min_ratio - 1e-9})
    lines = [f"FitPrune minus baselines at ratios >= {min_ratio} (accuracy; paired on the same questions, "
             f"+-1 SE of the mean difference, so differences within about 2 SE are noise):"]
    for r in ratios:
        ours = answers("fitprune", r)
        lines.append(f"  ratio {r:g}: " + ", ".join(f"vs {b}: {paired_difference(ours, answers(b, r))}"
                                                     for b in ("random", "uniform")))
    if not ratios:
        lines.append("  (no ratio >= %g was run or reachable)" % min_ratio)
    staged = sorted({x["method"] for x in results if x["method"].startswith(STAGED)}, key=method_rank)
    if staged:
        lines.append("FitPrune with at most K pruning layers minus unconstrained FitPrune, same budget (paired):")
        for r in sorted({x["ratio"] for x in results if x["method"] in staged}):
            free = answers("fitprune", r)
            lines.append(f"  ratio {r:g}: " + ", ".join(f"{m}: {paired_difference(answers(m, r), free)}"
                                                         for m in staged))
    return "\n".join(lines)


def write_all(out_dir, results, skipped, preds, prov, recipes) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rows = _ordered(results, skipped)
    atomic.write_text(os.path.join(out_dir, "accuracy.md"), markdown(rows, prov) + "\n" + comparison(results, preds) + "\n")
    with atomic.atomic_path(os.path.join(out_dir, "accuracy.csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(map(_cells, rows))
    fitted = {f"{r:g}": x.to_dict() if not isinstance(x, str) else x for r, x in recipes.items()}
    atomic.write_json(os.path.join(out_dir, "accuracy.json"),
                      {"format": FORMAT, "version": VERSION, "provenance": prov, "flops_convention": CONVENTION,
                       "results": rows, "fitprune_recipes": fitted}, indent=1, newline=False)
    atomic.write_text(os.path.join(out_dir, "predictions.jsonl"), "".join(json.dumps(p) + "\n" for p in preds))
    plot(results, os.path.join(out_dir, "accuracy.png"))
    print(markdown(rows, prov))
    print(f"wrote {out_dir}/accuracy.md, accuracy.csv, accuracy.json, accuracy.png, predictions.jsonl")
