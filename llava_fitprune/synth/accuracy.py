"""`llava-fitprune accuracy`: every pruning method's accuracy on the synthetic task at equal FLOPs.

    llava-fitprune accuracy [--checkpoint eval_data/synth_llava/checkpoint] [--ratios 0.1 ... 0.9]

Dense once, then fitprune, random, uniform and fastv at each FLOPs reduction ratio (lvprune once,
at its modules' own schedule, with --lvprune-modules; fitprune-kK with --max-pruning-layers K: FitPrune
fitted with at most K pruning layers, docs/fit.md). FitPrune's recipes are fitted on this model in
one statistics pass, from a calibration set drawn from the synthetic TRAIN split (never the test
questions); random uses FitPrune's schedule, fastv / uniform the least aggressive schedule whose
prefill FLOPs do not exceed FitPrune's (methods.py), matched on total prefill FLOPs (flops.py) at the
test questions' mean prompt length. A ratio is FitPrune's budget in --convention: by default the
paper's visual-token FLOPs (as the published recipes); "total" counts every prefill token. A method that cannot reach a
ratio is recorded as n/a with the reason. Each question's layer-0 inputs (image features inserted)
are built once and reused by every method; questions are generated greedily in left-padded batches.
Writes accuracy.md / .csv / .json / .png and predictions.jsonl to --out-dir.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict

import torch
from tqdm import tqdm

from ..utils import atomic
from ..cli.args import Parser, at_least, check_common, loading, output_dir
from ..cli.backend import require_backend
from ..core.flops import reference_text_tokens
from ..core.recipe import RecipeError, check_reduction_ratio
from .evaluate import _model_inputs, normalize, read_jsonl
from .scenes import SceneConfig, write_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CHECKPOINT = os.path.join(REPO_ROOT, "eval_data", "synth_llava", "checkpoint")
BASELINES = ("fitprune", "random", "uniform", "fastv")
DEFAULT_RATIOS = [round(0.1 * k, 1) for k in range(1, 10)]


def _ratio(text: str) -> float:
    try:
        return check_reduction_ratio(float(text))
    except (ValueError, RecipeError) as e:
        raise argparse.ArgumentTypeError(f"{e}; pass ratios in [0, 1), e.g. --ratios 0.5 0.7") from None


def parse_args(argv):
    p = Parser(prog="llava-fitprune accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="tiny LLaVA trained on the synthetic task")
    p.add_argument("--split", default=None, help="a test split dir (default: regenerate from the training seed)")
    p.add_argument("--num-scenes", type=int, default=150, help="test scenes when regenerating the split")
    p.add_argument("--calibration-samples", type=int, default=64, help="FitPrune calibration questions (train split)")
    p.add_argument("--methods", nargs="+", default=list(BASELINES), help=f"any of {', '.join(BASELINES)}, lvprune")
    p.add_argument("--ratios", nargs="+", type=_ratio, default=DEFAULT_RATIOS, help="FLOPs reduction ratios")
    p.add_argument("--convention", default="visual_only", choices=["visual_only", "total"],
                   help="what a ratio removes: the paper's visual-token FLOPs (default; 0.9 reachable at any depth) "
                        "or all prefill FLOPs; methods are matched on total FLOPs either way")
    p.add_argument("--lvprune-modules", default=None, help="trained LVPruning modules (folder): adds lvprune")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest gold answer + 1 token")
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--out-dir", default="accuracy_results")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-pruning-layers", type=int, nargs="+", default=[], metavar="K",
                   help="also FitPrune fitted with at most K pruning layers, as method fitprune-kK, at every ratio")
    a = p.parse_args(argv)
    unknown = [m for m in a.methods if m not in BASELINES + ("lvprune",)]
    if unknown:
        p.error(f"--methods: unknown method(s) {unknown}: choose from {', '.join(BASELINES)} (and lvprune with "
                f"--lvprune-modules)")
    if "lvprune" in a.methods and not a.lvprune_modules:
        p.error("lvprune needs its trained modules: pass --lvprune-modules DIR or drop lvprune from --methods")
    if a.lvprune_modules and "lvprune" not in a.methods:
        a.methods.append("lvprune")
    if not os.path.isfile(os.path.join(a.checkpoint, "config.json")):
        p.error(f"--checkpoint {a.checkpoint}: no checkpoint there (config.json missing): train one with `python -m "
                f"llava_fitprune.synth.train --data DATA/train --out {a.checkpoint}` or pass --checkpoint DIR")
    require_backend(p.prog, a.checkpoint, argv, "--checkpoint")  # a transformers-native one: .venv-hf
    if a.split and not os.path.isfile(os.path.join(a.split, "questions.jsonl")):
        p.error(f"--split {a.split} has no questions.jsonl: pass a split dir written by write_split (or omit --split)")
    at_least(p, a, 1, "num_scenes", "calibration_samples", "batch_size", "limit", "max_new_tokens", "max_pruning_layers")
    check_common(p, a)  # --threads, --conv-mode
    output_dir(p, a, "out_dir")
    a.max_pruning_layers = sorted(set(a.max_pruning_layers))
    a.ratios = sorted(set(a.ratios) - {0.0})  # ratio 0 is the dense row, run once
    return a


def data_seed(ckpt: str) -> tuple[int, str]:
    """The synthetic data seed the checkpoint was trained with, and where it came from."""
    path = os.path.join(ckpt, "train_record.json")
    if not os.path.isfile(path):
        return 0, "default (no train_record.json)"
    record = json.load(open(path))
    if "data_seed" in record:
        return int(record["data_seed"]), "train_record.json data_seed"
    meta = os.path.join(record.get("data", ""), "meta.json")
    if os.path.isfile(meta):
        return int(json.load(open(meta))["seed"]), f"{meta} (train_record.json data)"
    return 0, "default (train_record.json names no data seed)"


def generator_digest() -> str:
    """sha256 (16 hex) of the scene generator's source (draw, questions, scenes): what a cached split
    must have been written by to be reused."""
    from . import draw, questions, scenes

    h = hashlib.sha256()
    for module in (draw, questions, scenes):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cached_split(root: str, split: str, num: int, seed: int, cfg: SceneConfig) -> str:
    """write_split into root/<split>-seed<seed>-n<num>, reused when its meta.json matches and the
    generator's source is the one that wrote it (`generator.json` beside the split)."""
    d = os.path.join(root, f"{split}-seed{seed}-n{num}")
    meta, stamp = os.path.join(d, split, "meta.json"), os.path.join(d, "generator.json")
    digest = generator_digest()
    if os.path.isfile(meta) and os.path.isfile(stamp):
        old = json.load(open(meta))
        if (old.get("num_scenes"), old.get("seed"), old.get("config")) == (num, seed, asdict(cfg)) and \
                json.load(open(stamp)).get("source_sha256") == digest:
            return os.path.join(d, split)
    out = write_split(d, split, num, seed, cfg)
    atomic.write_json(stamp, {"source_sha256": digest}, indent=None, newline=False)  # last: marks the split complete
    return out


@torch.inference_mode()
def layer0_inputs(model, tok, proc, questions, image_folder, conv_mode) -> list[tuple]:
    """Per question: (inputs_embeds [N, D], visual_mask [N] bool), as model.generate would build them."""
    out = []
    for q in tqdm(questions, desc="inputs (vision tower)"):
        ids, image, size = _model_inputs(model, tok, proc, q, image_folder, conv_mode)  # [1, T], [1, 3, H, W]
        *_, embeds, _, visual = model.prepare_multimodal(ids.to(model.device), None, None, None, None,
                                                         image.to(model.device, model.dtype), [size])
        out.append((embeds[0], visual[0]))  # [N, D], [N]
    return out


@torch.inference_mode()
def generate_batch(model, tok, items, max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch of layer-0 inputs, left-padded (the model's own generate path)."""
    from transformers import GenerationMixin

    B, N, D = len(items), max(e.shape[0] for e, _ in items), items[0][0].shape[1]
    embeds = items[0][0].new_zeros(B, N, D)  # [B, N, D]
    mask = torch.zeros(B, N, dtype=torch.long, device=embeds.device)  # [B, N]
    visual = torch.zeros(B, N, dtype=torch.bool, device=embeds.device)  # [B, N]
    for b, (e, v) in enumerate(items):
        embeds[b, N - e.shape[0]:], mask[b, N - e.shape[0]:], visual[b, N - e.shape[0]:] = e, 1, v
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = GenerationMixin.generate(model, inputs_embeds=embeds, attention_mask=mask, visual_mask=visual,
                                   do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                                   pad_token_id=pad)  # [B, new tokens]
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def text_tokens(inputs: list[tuple]) -> list[int]:
    """Text tokens of each prompt in `inputs` ((embeds [N, D], visual mask [N]) per question)."""
    return [int(e.shape[0] - v.sum()) for e, v in inputs]


def run_combo(model, tok, inputs, questions, gold, batch_size, max_new_tokens, desc) -> tuple[dict, list]:
    """Exact-match counts {category: [correct, total]} (plus "overall") and the prediction rows."""
    counts, rows = defaultdict(lambda: [0, 0]), [None] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: inputs[i][0].shape[0])  # equal lengths batch unpadded
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        texts = generate_batch(model, tok, [inputs[i] for i in idx], max_new_tokens)
        for i, text in zip(idx, texts):
            q = questions[i]
            ok = normalize(text) == normalize(gold[q["question_id"]])
            for key in (q.get("category", "all"), "overall"):
                counts[key][0] += ok
                counts[key][1] += 1
            rows[i] = {"question_id": q["question_id"], "category": q.get("category", "all"), "text": text,
                       "gold": gold[q["question_id"]], "correct": ok}
    return dict(counts), rows


def fitted_recipes(model, tok, proc, ratios, seed, n_visual, *, data_root, num_samples, conv_mode="vicuna_v1",
                   convention="visual_only", batch_size=8, max_pruning_layers=None) -> tuple[dict, dict]:
    """{ratio: FitPrune Recipe or the reason it cannot be had}, calibration provenance.
    `max_pruning_layers`: K, fitted with at most K pruning layers (a K the model cannot take: every ratio n/a).

    Calibrated on `num_samples` questions of training scenes of data seed `seed` (generated into
    `data_root`, reused when already there): the task's own distribution, never the test split.
    """
    from ..adapters.llava.calibration import build_calibration
    from ..core.fit import fit
    from ..core.flops import LMShape, reduction_for

    cfg = SceneConfig(train_per_type=1)  # 4 questions per train scene; calibration draws one scene per sample
    train = cached_split(data_root, "train", num_samples, seed, cfg)
    calib = build_calibration(model, tok, proc, os.path.join(train, "questions.jsonl"), os.path.join(train, "images"),
                              conv_mode=conv_mode, num_samples=num_samples, seed=seed)
    shape = LMShape.from_config(model.config)
    n_text = reference_text_tokens([s.num_tokens - s.num_visual for s in calib.samples])  # the fit's reference text
    top = reduction_for(shape, n_text, n_visual, [n_visual] + [0] * (shape.num_layers - 1), convention)
    out = {r: f"out of reach: dropping all {n_visual} visual tokens at layer 0 removes only {top:.3f} of the " \
              f"prefill FLOPs ({convention})" for r in ratios if r > top}
    reachable = [r for r in ratios if r not in out]
    if reachable:
        try:
            out.update(zip(reachable, fit(model, calib, reachable, convention=convention, batch_size=batch_size,
                                          max_pruning_layers=max_pruning_layers)))
        except RecipeError as e:
            out.update({r: str(e) for r in reachable})
    return out, {**calib.meta, "split_dir": train, "reference_text_tokens": n_text, "max_reduction": round(top, 6)}


def split_questions(split: str, limit: int | None = None) -> tuple[list[dict], dict]:
    """(the first `limit` question rows, {question_id: gold answer}) of a split written by write_split."""
    path = os.path.join(split, "questions.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the shipped split is eval_data/synth_llava/test, or make one "
                                f"with python -m llava_fitprune.synth.scenes")
    gold = {a["question_id"]: a["answer"] for a in read_jsonl(os.path.join(split, "answers.jsonl"))}
    return read_jsonl(path)[:limit], gold


def schedules(model, args, recipes, n_text, n_visual, staged=None):
    """(method, ratio, recipe or None, selector, modules config) to run, and (method, ratio, reason) n/a.
    `staged`: {K: {ratio: recipe or reason}} fitted with at most K pruning layers, run as fitprune-kK."""
    from ..core.methods import build_method

    runs, skipped = [("dense", 0.0, None, None, None)], []
    staged = staged or {}
    for r in args.ratios:
        todo = [(m, m, recipes) for m in BASELINES if m in args.methods]
        todo += [(f"fitprune-k{K}", "fitprune", staged[K]) for K in sorted(staged)]
        for name, m, fitted in todo:
            if isinstance(fitted[r], str):
                skipped.append((name, r, fitted[r]))
                continue
            try:
                recipe, selector = build_method(m, recipe=fitted[r], model=model, num_text_tokens=n_text,
                                                num_visual_tokens=n_visual)
            except (ValueError, RecipeError) as e:
                skipped.append((name, r, str(e)))
                continue
            runs.append((name, r, recipe, selector, None))
    if "lvprune" in args.methods:
        from ..lvprune.selector import as_modules

        modules = as_modules(args.lvprune_modules).to(model.device).eval()
        recipe, selector = build_method("lvprune", model=model, modules=modules, num_text_tokens=n_text,
                                        num_visual_tokens=n_visual)
        runs.append(("lvprune", None, recipe, selector, modules.config))
    else:
        skipped.append(("lvprune", None, "not run: no --lvprune-modules given"))
    return runs, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # restore: main may be called in-process (tests)


def _run(args) -> int:
    from .. import load_pretrained_model
    from ..core.method_flops import method_flops
    from . import accuracy_report as report

    seed, seed_source = data_seed(args.checkpoint)
    split = args.split or cached_split(os.path.join(args.out_dir, "data"), "test", args.num_scenes, seed, SceneConfig())
    questions, gold = split_questions(split, args.limit)
    name = os.path.basename(os.path.normpath(args.checkpoint))
    with loading("llava-fitprune accuracy", "checkpoint", args.checkpoint):
        tok, model, proc, _ = load_pretrained_model(args.checkpoint, None, name if "llava" in name.lower() else
                                                    f"llava-{name}", device="cpu", torch_dtype=torch.float32,
                                                    attn_implementation="sdpa")
    max_new = args.max_new_tokens or 1 + max(len(tok(gold[q["question_id"]], add_special_tokens=False).input_ids)
                                             for q in questions)
    inputs = layer0_inputs(model, tok, proc, questions, os.path.join(split, "images"), args.conv_mode)
    n_visual = int(inputs[0][1].sum())
    texts = text_tokens(inputs)
    n_text = reference_text_tokens(texts)
    recipes, calib_meta = fitted_recipes(model, tok, proc, args.ratios, seed, n_visual,
                                         data_root=os.path.join(args.out_dir, "data"),
                                         num_samples=args.calibration_samples, conv_mode=args.conv_mode,
                                         convention=args.convention, batch_size=args.batch_size)
    staged = {K: fitted_recipes(model, tok, proc, args.ratios, seed, n_visual,
                                data_root=os.path.join(args.out_dir, "data"), num_samples=args.calibration_samples,
                                conv_mode=args.conv_mode, convention=args.convention, batch_size=args.batch_size,
                                max_pruning_layers=K)[0] for K in args.max_pruning_layers}
    runs, skipped = schedules(model, args, recipes, n_text, n_visual, staged)
    shape = report.model_shape(model)
    results, preds = [], []
    print(f"{len(questions)} questions, {len(runs)} runs, max_new_tokens {max_new}, batch {args.batch_size}")
    for method, ratio, recipe, selector, modules_cfg in tqdm(runs, desc="methods x ratios"):
        model.set_pruning(recipe, selector)
        t0 = time.perf_counter()
        counts, rows = run_combo(model, tok, inputs, questions, gold, args.batch_size, max_new, f"{method} {ratio}")
        secs = time.perf_counter() - t0
        flops = [method_flops(shape, recipe, t, n_visual, modules_cfg) for t in texts]
        results.append(report.row(method, ratio, recipe, counts, flops, secs))
        preds += [{"method": method, "ratio": ratio, **p} for p in rows]
        tqdm.write(f"{method:8s} {ratio if ratio is not None else '-'}: accuracy {results[-1]['accuracy']:.3f}, "
                   f"{secs:.1f} s ({secs / len(questions) * 1e3:.0f} ms/question)")
    model.set_pruning(None)
    provenance = report.provenance(args, split, seed, seed_source, len(questions), max_new, n_text, n_visual,
                                   calib_meta)
    report.write_all(args.out_dir, results, skipped, preds, provenance, recipes)
    print(report.comparison(results, preds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
