"""`llava-fitprune accuracy` in .venv-hf: the synthetic task's per-method table through the transformers
backend, on the shipped synthetic LLaVA converted to llava-hf (adapters/hf/convert.py).

    llava-fitprune accuracy --convert-from eval_data/synth_llava/checkpoint --checkpoint synth-hf [--limit 8]

The same questions, prompts (vicuna_v1, LLaVA's `tokenizer_image_token` ids with the image index
expanded to llava-hf's placeholders), calibration sampling, recipe fit, method schedules, batches and
report as the LLaVA backend's `llava_fitprune.synth.accuracy`, so the two backends' tables compare
question by question (tests_hf/test_cli_hf.py checks the answers).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
import types

import torch

from ..synth import accuracy as synth
from ..synth.scenes import SceneConfig
from .args import Parser, at_least, output_dir
from .backend import require_backend

# llava-torch 1.2.2.post1 llava/conversation.py conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>")
VICUNA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions. USER: <image>\n{question} ASSISTANT:")
# files of the LLaVA checkpoint a converted one keeps: its tokenizer and the training record (data seed)
KEPT_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "train_record.json")


def parse_args(argv):
    p = Parser(prog="llava-fitprune accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the synthetic LLaVA converted to llava-hf (a folder)")
    p.add_argument("--convert-from", default=None,
                   help="convert this haotian-liu synthetic checkpoint into --checkpoint first (if it is not there)")
    p.add_argument("--split", default=None)
    p.add_argument("--num-scenes", type=int, default=150)
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=list(synth.BASELINES), help=f"any of {', '.join(synth.BASELINES)}")
    p.add_argument("--ratios", nargs="+", type=synth._ratio, default=synth.DEFAULT_RATIOS)
    p.add_argument("--convention", default="visual_only", choices=["visual_only", "total"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out-dir", default="accuracy_results_hf")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    for m in a.methods:
        if m not in synth.BASELINES:
            p.error(f"--methods {m}: {'LLaVA backend only' if m == 'lvprune' else 'unknown method'}: choose from "
                    f"{', '.join(synth.BASELINES)}")
    if a.convert_from is not None:
        if not os.path.isfile(os.path.join(a.convert_from, "vision_tower", "config.json")):
            p.error(f"--convert-from {a.convert_from}: not a synthetic LLaVA checkpoint (no vision_tower/config.json)")
    elif not os.path.isfile(os.path.join(a.checkpoint, "config.json")):
        p.error(f"--checkpoint {a.checkpoint}: no config.json: pass a converted checkpoint, or --convert-from "
                f"eval_data/synth_llava/checkpoint to make it")
    else:
        require_backend(p.prog, a.checkpoint, argv, "--checkpoint")
    if a.split and not os.path.isfile(os.path.join(a.split, "questions.jsonl")):
        p.error(f"--split {a.split} has no questions.jsonl: pass a split dir written by write_split (or omit --split)")
    at_least(p, a, 1, "num_scenes", "calibration_samples", "batch_size", "limit", "max_new_tokens", "threads")
    output_dir(p, a, "out_dir")
    a.ratios = sorted(set(a.ratios) - {0.0})
    a.conv_mode, a.lvprune_modules, a.max_pruning_layers = "vicuna_v1", None, []
    return a


def convert_synth_checkpoint(src: str, out: str) -> str:
    """The synthetic LLaVA checkpoint `src` as llava-hf in `out`, with its tokenizer, the vision tower's
    preprocessor config and its training record."""
    from ..adapters.hf.convert import convert_llava_to_hf

    tmp = out.rstrip(os.sep) + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_llava_to_hf(src, os.path.join(src, "vision_tower"), tmp)
    # the LLaVA tokenizer itself, as 4.37 reads it: the fast tokenizer the converted processor saved
    # (tokenizer.json) splits the text after <image> otherwise (one more token), so it goes
    for name in ("tokenizer.json", "added_tokens.json"):
        if os.path.isfile(os.path.join(tmp, name)):
            os.remove(os.path.join(tmp, name))
    for name in KEPT_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), tmp)
    shutil.copy(os.path.join(src, "vision_tower", "preprocessor_config.json"), tmp)
    os.replace(tmp, out)  # complete or absent
    return out


def load(checkpoint: str):
    """(model, tokenizer, image processor): fp32, sdpa, on the CPU (as the LLaVA backend's accuracy)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..adapters.hf import enable_pruning

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    return enable_pruning(model), AutoTokenizer.from_pretrained(checkpoint), \
        CLIPImageProcessorPil.from_pretrained(checkpoint)


def prompt_ids(tok, question: str, num_visual: int, image_id: int) -> list[int]:
    """LLaVA's ids for the vicuna_v1 prompt, the image index expanded to `num_visual` llava-hf placeholders."""
    # Adapted from llava-torch 1.2.2.post1 llava/mm_utils.py tokenizer_image_token: chunks around <image>
    # tokenized on their own, the BOS of every chunk after the first dropped
    chunks = [tok(c).input_ids for c in VICUNA_V1.format(question=question).split("<image>")]
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [image_id] * num_visual + (c[1:] if c and c[0] == tok.bos_token_id else c)
    return ids


def num_visual_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2  # vision_feature_select_strategy "default": the CLS row dropped


@torch.inference_mode()
def question_inputs(model, tok, image_processor, questions, image_folder) -> list[dict]:
    """Per question: input_ids [T] (placeholders expanded), pixel_values [3, H, W]; LLaVA's image padding
    to a square is a no-op on the task's square images (checked)."""
    from PIL import Image

    n, image_id, out = num_visual_tokens(model), model.config.image_token_id, []
    for q in questions:
        image = Image.open(os.path.join(image_folder, q["image"])).convert("RGB")
        if image.width != image.height:
            raise ValueError(f"{q['image']}: not square: LLaVA's pad-to-square preprocessing is not reproduced here")
        ids = torch.tensor(prompt_ids(tok, q["text"], n, image_id))
        out.append({"input_ids": ids, "pixel_values": image_processor(images=[image], return_tensors="pt")
                    ["pixel_values"][0]})
    return out


@torch.inference_mode()
def generate_batch(model, tok, items, max_new_tokens: int) -> list[str]:
    """Greedy answers of a left-padded batch."""
    T = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), T), tok.pad_token_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, x in enumerate(items):
        ids[b, T - len(x["input_ids"]):], mask[b, T - len(x["input_ids"]):] = x["input_ids"], 1
    pixels = torch.stack([x["pixel_values"] for x in items])  # [B, 3, H, W]
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return [t.strip() for t in tok.batch_decode(out[:, T:], skip_special_tokens=True)]


def run_combo(model, tok, inputs, questions, gold, batch_size, max_new_tokens) -> tuple[dict, list]:
    """synth.accuracy.run_combo's counts and rows, batched in the same order (by prompt length)."""
    from collections import defaultdict

    from ..synth.evaluate import normalize

    counts, rows = defaultdict(lambda: [0, 0]), [None] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: len(inputs[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, text in zip(idx, generate_batch(model, tok, [inputs[i] for i in idx], max_new_tokens)):
            q = questions[i]
            ok = normalize(text) == normalize(gold[q["question_id"]])
            for key in (q.get("category", "all"), "overall"):
                counts[key][0] += ok
                counts[key][1] += 1
            rows[i] = {"question_id": q["question_id"], "category": q.get("category", "all"), "text": text,
                       "gold": gold[q["question_id"]], "correct": ok}
    return dict(counts), rows


@torch.inference_mode()
def calibration(model, tok, image_processor, questions, image_folder):
    """CalibrationSamples (layer-0 inputs the VLM hands its text model) of LLaVA-format questions."""
    from ..adapters.hf.calibration import text_model_inputs
    from ..core.calibration import CalibrationSample
    from ..core.prefill_plan import text_after_last_image

    samples = []
    for q, x in zip(questions, question_inputs(model, tok, image_processor, questions, image_folder)):
        ids = x["input_ids"][None]
        embeds = text_model_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                           "pixel_values": x["pixel_values"][None]})["inputs_embeds"]  # [1, N, D]
        visual = model.fitprune_visual_mask(ids)  # [1, N]
        position_ids = torch.arange(ids.shape[1])[None]
        rope = model.fitprune_text_model.rotary_emb(embeds, position_ids)
        samples.append(CalibrationSample(q["question_id"], embeds, visual,
                                         text_after_last_image(visual, torch.ones_like(visual)), rope=rope))
    return samples


def fitted_recipes(model, tok, image_processor, args, seed, n_visual):
    """synth.accuracy.fitted_recipes through this backend: {ratio: Recipe or reason}, calibration meta."""
    from ..core.calibration import CalibrationSet, read_questions, sample_questions
    from ..core.fit import fit
    from ..core.flops import reduction_for, reference_text_tokens
    from ..core.recipe import RecipeError

    train = synth.cached_split(os.path.join(args.out_dir, "data"), "train", args.calibration_samples, seed,
                               SceneConfig(train_per_type=1))
    questions = read_questions(os.path.join(train, "questions.jsonl"))
    picked = sample_questions(questions, args.calibration_samples, seed)
    calib = CalibrationSet(calibration(model, tok, image_processor, picked, os.path.join(train, "images")),
                           {"num_samples": len(picked), "seed": seed, "question_ids": [q["question_id"] for q in picked]})
    shape = model.fitprune_shape
    n_text = reference_text_tokens([s.num_tokens - s.num_visual for s in calib.samples])
    top = reduction_for(shape, n_text, n_visual, [n_visual] + [0] * (shape.num_layers - 1), args.convention)
    out = {r: f"out of reach: dropping all {n_visual} visual tokens at layer 0 removes only {top:.3f} of the "
              f"prefill FLOPs ({args.convention})" for r in args.ratios if r > top}
    reachable = [r for r in args.ratios if r not in out]
    if reachable:
        try:
            out.update(zip(reachable, fit(model, calib, reachable, convention=args.convention,
                                          batch_size=args.batch_size, progress=False)))
        except RecipeError as e:
            out.update({r: str(e) for r in reachable})
    return out, {**calib.meta, "split_dir": train, "reference_text_tokens": n_text, "max_reduction": round(top, 6)}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        if args.convert_from is not None and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            convert_synth_checkpoint(args.convert_from, args.checkpoint)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from ..core.flops import reference_text_tokens
    from ..core.method_flops import method_flops
    from ..synth import accuracy_report as report

    seed, seed_source = synth.data_seed(args.checkpoint)
    split = args.split or synth.cached_split(os.path.join(args.out_dir, "data"), "test", args.num_scenes, seed,
                                             SceneConfig())
    questions, gold = synth.split_questions(split, args.limit)
    model, tok, image_processor = load(args.checkpoint)
    max_new = args.max_new_tokens or 1 + max(len(tok(gold[q["question_id"]], add_special_tokens=False).input_ids)
                                             for q in questions)
    inputs = question_inputs(model, tok, image_processor, questions, os.path.join(split, "images"))
    n_visual = num_visual_tokens(model)
    texts = [len(x["input_ids"]) - n_visual for x in inputs]
    n_text = reference_text_tokens(texts)
    recipes, calib_meta = fitted_recipes(model, tok, image_processor, args, seed, n_visual)
    text_lm = types.SimpleNamespace(config=model.config.get_text_config(decoder=True))  # the shapes build_method reads
    runs, skipped = synth.schedules(text_lm, args, recipes, n_text, n_visual)
    shape = model.fitprune_shape
    results, preds = [], []
    print(f"{len(questions)} questions, {len(runs)} runs, max_new_tokens {max_new}, batch {args.batch_size} "
          f"(transformers backend)")
    for method, ratio, recipe, selector, _ in runs:
        if recipe is None:
            model.set_pruning(None)
        else:
            model.set_pruning(recipe, selector=selector)
        t0 = time.perf_counter()
        counts, rows = run_combo(model, tok, inputs, questions, gold, args.batch_size, max_new)
        secs = time.perf_counter() - t0
        flops = [method_flops(shape, recipe, t, n_visual, None) for t in texts]
        results.append(report.row(method, ratio, recipe, counts, flops, secs))
        preds += [{"method": method, "ratio": ratio, **p} for p in rows]
        print(f"{method:8s} {ratio}: accuracy {results[-1]['accuracy']:.3f}, {secs:.1f} s")
    model.set_pruning(None)
    provenance = report.provenance(args, split, seed, seed_source, len(questions), max_new, n_text, n_visual,
                                   calib_meta)
    provenance["backend"] = "transformers"
    report.write_all(args.out_dir, results, skipped, preds, provenance, recipes)
    print(report.comparison(results, preds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
