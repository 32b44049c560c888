"""`llava-fitprune demo`: the same questions answered dense and at several FLOPs budgets.

With no `--model-path`, a tiny LLaVA-1.5 is built offline: the trained synthetic-task checkpoint
shipped in `eval_data/synth_llava/checkpoint` when this is a source checkout that has it, else a
random 32-layer model (random weights give arbitrary answers, but every number is real). On the
trained checkpoint (or any with `--synth-split`) the questions come from its held-out split with their
gold answers, recipes are fitted on the task's training scenes, and each budget's accuracy on the first
`--accuracy-questions` held-out questions is measured live.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .args import Parser, at_least, check_common, loading, output_dir
from ..core.flops import LMShape, prefill_report
from ..utils.plots import plot_schedules
from ..core.recipe import Recipe, RecipeError, builtin_recipe, check_reduction_ratio

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_CHECKPOINT = os.path.join(REPO_ROOT, "eval_data", "synth_llava", "checkpoint")
SHIPPED_SPLIT = os.path.join(REPO_ROOT, "eval_data", "synth_llava", "test")


def sample_images(size: int = 336):
    """Three deterministic scenes (PIL) with the questions the demo asks about them."""
    from PIL import Image, ImageDraw

    def scene(shapes, text=None):
        img = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(img)
        for kind, colour, (x, y), r in shapes:
            box = [x - r, y - r, x + r, y + r]
            (d.ellipse if kind == "circle" else d.rectangle)(box, fill=colour)
        if text:
            d.text((size // 2, size // 8), text, fill="black")
        return img

    s = size
    return [
        (scene([("circle", "red", (s // 4, s // 2), s // 10), ("square", "blue", (3 * s // 4, s // 2), s // 10)]),
         "What is the colour of the circle? Answer with a single word."),
        (scene([("square", "green", (s // 3, s // 3), s // 12), ("circle", "yellow", (2 * s // 3, 2 * s // 3), s // 12)]),
         "Is the square left of the circle? Answer yes or no."),
        (scene([("circle", "purple", (s // 2, s // 2), s // 8)], text="7"),
         "What digit is written in the image?"),
    ]


BUNDLED_CALIBRATION = os.path.join(REPO_ROOT, "eval_data", "calibration", "tiny")


def recipes_for(model, ratios, tokenizer, image_processor, conv_mode) -> list[Recipe]:
    """The authors' recipes for a 32-layer model; for another depth, recipes fitted on the bundled
    calibration set under the paper's visual-only FLOPs convention (a tiny model's text tokens and
    first layer alone can exceed a 0.9 budget of total FLOPs)."""
    if len(model.get_model().layers) == 32:
        return [builtin_recipe(r) for r in ratios]
    from ..adapters.llava.calibration import build_calibration
    from ..core.fit import fit

    questions = os.path.join(BUNDLED_CALIBRATION, "questions.jsonl")
    if not os.path.isfile(questions):
        raise SystemExit(f"this model has {len(model.get_model().layers)} layers, so the demo fits recipes on "
                         f"{BUNDLED_CALIBRATION}, which is missing: run from a source checkout")
    calib = build_calibration(model, tokenizer, image_processor, questions, os.path.join(BUNDLED_CALIBRATION, "images"),
                              conv_mode=conv_mode, num_samples=12, seed=0)
    return fit(model, calib, list(ratios), convention="visual_only")


def _prompt(tokenizer, question, conv_mode, mm_use_im_start_end=False):
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


@torch.no_grad()
def _prefill_ms(model, ids, images, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids, images=images, use_cache=True)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = Parser(prog="llava-fitprune demo", description=__doc__)
    p.add_argument("--model-path", default=None, help="a LLaVA-1.5 checkpoint (default: a tiny offline one)")
    p.add_argument("--model-base", default=None)
    p.add_argument("--reduction-ratio", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--method", default="fitprune", choices=["fitprune", "random", "fastv", "uniform"],
                   help="token selection; fastv/uniform run at equal FLOPs to each FitPrune recipe")
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="prefill timings: median over this many runs")
    p.add_argument("--out", default="out/demo", help="folder for the plot")
    p.add_argument("--synth-split", default=None,
                   help="a synthetic-task test split to ask (default with the shipped checkpoint: eval_data/synth_llava/test)")
    p.add_argument("--num-questions", type=int, default=4, help="synthetic questions shown one by one")
    p.add_argument("--accuracy-questions", type=int, default=60,
                   help="synthetic questions scored for each budget (0: skip)")
    args = p.parse_args(argv)
    try:
        ratios = [check_reduction_ratio(r) for r in args.reduction_ratio]
    except RecipeError as e:
        p.error(str(e))
    at_least(p, args, 1, "num_questions", "max_new_tokens", "repeats")
    at_least(p, args, 0, "accuracy_questions")
    check_common(p, args)  # --model-path, --device, --attn-implementation, --conv-mode
    if args.synth_split and not os.path.isfile(os.path.join(args.synth_split, "questions.jsonl")):
        p.error(f"--synth-split {args.synth_split} has no questions.jsonl: pass a split written by "
                f"python -m llava_fitprune.synth.scenes")
    output_dir(p, args, "out")  # before the minutes of work whose plot it keeps
    torch.manual_seed(0)

    from llava.mm_utils import get_model_name_from_path, process_images
    from .. import load_pretrained_model
    from ..core.methods import build_method
    from ..core.selectors import make_selector
    from ..adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

    model_path, synth_split = args.model_path, args.synth_split
    if model_path is None:
        if os.path.isfile(os.path.join(SHIPPED_CHECKPOINT, "config.json")):
            model_path, synth_split = SHIPPED_CHECKPOINT, synth_split or SHIPPED_SPLIT
            print(f"model: the trained tiny LLaVA shipped in {model_path}")
        else:
            model_path = os.path.join(tempfile.mkdtemp(), "llava-tiny-demo")
            print("model: a tiny random LLaVA-1.5 (32 layers, 576 visual tokens) built offline; answers are noise")
            build_tiny_llava(model_path, TinyLlavaSpec(num_layers=32))
    name = get_model_name_from_path(model_path)
    name = name if "llava" in name.lower() else f"llava-{name}"
    with loading(p.prog, "model_path", model_path):
        tokenizer, model, image_processor, _ = load_pretrained_model(
            model_path, args.model_base, name, device=args.device, torch_dtype=args.dtype,
            attn_implementation=args.attn_implementation)
    if synth_split:
        from PIL import Image

        from ..synth.accuracy import split_questions
        from ..synth.demo_task import task_recipes

        recipes = [None] + task_recipes(model, tokenizer, image_processor, model_path, ratios, args.conv_mode)
        questions, gold = split_questions(synth_split, args.num_questions)
        samples = [(Image.open(os.path.join(synth_split, "images", q["image"])).convert("RGB"), q["text"],
                    gold[q["question_id"]]) for q in questions]
    else:
        recipes = [None] + recipes_for(model, ratios, tokenizer, image_processor, args.conv_mode)
        samples = [(image, question, None) for image, question in sample_images(model.get_vision_tower().config.image_size)]

    def configure(base, n_text):
        """Dense (base None), a FitPrune recipe, or another method at its FLOPs."""
        if base is None or args.method in ("fitprune", "random"):
            model.set_pruning(base, make_selector(args.method))
        else:
            model.set_pruning(*build_method(args.method, recipe=base, model=model, num_text_tokens=n_text,
                                            num_visual_tokens=base.num_visual_tokens))
    shape = LMShape.from_config(model.config)
    L = shape.num_layers
    quarters = [0, L // 4, L // 2, 3 * L // 4, L]

    header = ["image", "ratio"] + [f"visual@{q}" for q in quarters] + ["prefill TFLOPs", "reduction (total FLOPs)", "prefill ms", "answer", "gold"]
    rows = []
    for i, (image, question, gold_answer) in enumerate(samples):
        ids = _prompt(tokenizer, question, args.conv_mode).to(model.device)
        images = process_images([image], image_processor, model.config).to(model.device, dtype=model.dtype)
        n_text_prompt = int((ids[0] >= 0).sum())
        for base in recipes:  # None (dense) or a FitPrune recipe; other methods run at its FLOPs
            configure(base, n_text_prompt)
            recipe = model.recipe
            out = model.generate(ids, images=images, image_sizes=[image.size], do_sample=False,
                                 max_new_tokens=args.max_new_tokens, use_cache=True)
            answer = tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
            trace = model.last_trace
            n_total = trace.tokens_entering[0]
            n_visual = int(model.prepare_multimodal(ids, None, None, None, None, images, [image.size])[-1].sum())
            drops = recipe.drops_for(n_visual) if recipe else None
            rep = prefill_report(shape, n_total - n_visual, n_visual, drops)
            alive = recipe.visual_tokens_entering(n_visual) if recipe else [n_visual] * (L + 1)
            ms = _prefill_ms(model, ids, images, args.repeats)
            ratio = "dense" if base is None else f"{args.method} {base.reduction_ratio:g}"
            rows.append([str(i), ratio] + [str(alive[q]) for q in quarters] +
                        [f"{rep.pruned_flops / 1e12:.4f}", f"{rep.reduction:.3f}", f"{ms:.1f}", repr(answer),
                         "-" if gold_answer is None else repr(gold_answer)])
        print(f"image {i}: {question!r}")

    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if synth_split and args.accuracy_questions:
        from ..synth.demo_task import accuracy_table

        configs = [("dense", None)] + [(f"{args.method} {r.reduction_ratio:g}", r) for r in recipes[1:]]
        print(f"\naccuracy % on the first {args.accuracy_questions} questions of {synth_split} "
              f"(the full table: llava-fitprune accuracy, BENCHMARKS.md)")
        print(accuracy_table(model, tokenizer, image_processor, synth_split, configs,
                             configure, args.accuracy_questions, args.conv_mode))
    png = plot_schedules([r for r in recipes if r is not None], os.path.join(args.out, "tokens_per_layer.png"),
                         title=f"{name}: visual tokens entering each layer")
    print(f"\nplot: {png}")
    return 0
