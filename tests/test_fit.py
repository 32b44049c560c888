"""FitPrune's fit: budgets met, least alpha, determinism, planted attention structure, bad inputs, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from llava_fitprune.core.calibration import CalibrationError, CalibrationSample, read_questions, sample_questions
from llava_fitprune.core.fit import fit
from llava_fitprune.core.fit_runner import _Rows, _run_layer, collect_statistics, schedule_for, simulate
from llava_fitprune.core.flops import LMShape, reduction_for
from llava_fitprune.adapters.llava.modeling import FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM
from llava_fitprune.core.recipe import Recipe, RecipeError, load_recipe
from llava_fitprune.core.selectors import FitPruneSelector, RandomSelector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CALIB = os.path.join(ROOT, "eval_data", "calibration", "tiny")
FLAG, MARK = 0, 1  # hidden dims: "a text token" and "an important visual token" (planted model)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for this module


def tiny_lm(num_layers=4, seed=0, plant=False, name="llava-synth"):
    """An in-memory pruning-aware LLaVA language model (no vision tower): h 64, 4 heads of 16."""
    cfg = FitPruneLlavaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    cfg._name_or_path = f"/somewhere/{name}"
    torch.manual_seed(seed)
    model = FitPruneLlavaLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
        model.get_model().embed_tokens.weight.normal_(0.0, 1.0)
        if plant:
            _plant(model)
    return model


def _plant(model, strength=1.6, flag=4.0):
    """Text queries attend strongly to visual tokens carrying MARK, in every layer and head.

    The planted q/k pair sits in the rotary pair of lowest frequency (head dims hd/2 - 1 and
    hd - 1), so relative positions barely rotate it; o_proj and down_proj leave FLAG and MARK
    untouched, so the residual stream carries them through every layer.
    """
    emb = model.get_model().embed_tokens.weight
    emb[:, FLAG], emb[:, MARK] = flag, 0.0
    for layer in model.get_model().layers:
        attn = layer.self_attn
        hd = attn.head_dim
        for h in range(attn.num_heads):
            for w, src in ((attn.q_proj.weight, FLAG), (attn.k_proj.weight, MARK)):
                w[h * hd + hd // 2 - 1] = 0.0
                w[h * hd + hd - 1] = 0.0
                w[h * hd + hd // 2 - 1, src] = strength
        for w in (attn.o_proj.weight, layer.mlp.down_proj.weight):
            w[[FLAG, MARK]] = 0.0


def synth_samples(model, n, seed, num_visual=64, pre=10, post=12, important=16):
    """Samples [pre text | visual | post text]; `important` visual tokens per sample carry MARK."""
    g = torch.Generator().manual_seed(seed)
    emb = model.get_model().embed_tokens.weight.detach()
    D, out = emb.shape[1], []
    for i in range(n):
        ids = torch.randint(3, emb.shape[0], (pre + post,), generator=g)
        vis = torch.randn(num_visual, D, generator=g)
        vis[:, FLAG], vis[:, MARK] = 4.0, 0.0  # every token queries MARK (as text does)
        vis[torch.randperm(num_visual, generator=g)[:important], MARK] = 4.0
        x = torch.cat([emb[ids[:pre]], vis, emb[ids[pre:]]])[None]  # [1, N, D]
        visual = torch.zeros(1, x.shape[1], dtype=torch.bool)
        visual[0, pre:pre + num_visual] = True
        text = torch.zeros_like(visual)
        text[0, pre + num_visual:] = True
        out.append(CalibrationSample(f"s{seed}-{i}", x, visual, text))
    return out


@pytest.fixture(scope="module")
def random_setup():
    model = tiny_lm()
    samples = synth_samples(model, 8, seed=1)
    recipes = fit(model, samples, [0.3, 0.6, 0.9], convention="visual_only", progress=False, batch_size=4)
    return model, samples, recipes


def test_runner_dense_matches_model(random_setup):
    model, samples, _ = random_setup
    rows = _Rows.start(samples[:3])
    for layer in model.get_model().layers:
        _run_layer(layer, rows, [0, 1, 2], max(s.num_tokens for s in samples))
    for i, s in enumerate(samples[:3]):
        with torch.no_grad():
            ref = model.model(inputs_embeds=s.inputs_embeds, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(model.get_model().norm(rows.hidden[i]), ref[0], atol=1e-4)


def test_budgets_met_within_one_percent_and_monotone(random_setup):
    model, samples, recipes = random_setup
    shape, n_text = LMShape.from_config(model.config), samples[0].num_tokens - samples[0].num_visual
    totals, means = [], []
    for r, ratio in zip(recipes, [0.3, 0.6, 0.9]):
        got = reduction_for(shape, n_text, 64, r.drop_per_layer, "visual_only")
        assert ratio <= got <= ratio + 0.01, (ratio, got, r.drop_per_layer)
        assert r.achieved_reduction == round(got, 6) and r.reduction_ratio == ratio
        assert r.flops_convention == "visual_only" and r.method == "fitprune" and r.num_visual_tokens == 64
        assert r.model == {"name": "llava-synth", **shape.to_dict()}
        totals.append(r.total_dropped)
        means.append(sum(r.visual_tokens_entering()[:-1]))
    assert totals[0] < totals[1] < totals[2] and means[0] > means[1] > means[2]


def test_total_convention(random_setup):
    model, samples, _ = random_setup
    shape, n_text = LMShape.from_config(model.config), samples[0].num_tokens - samples[0].num_visual
    for r in fit(model, samples, [0.3, 0.5], progress=False):
        got = reduction_for(shape, n_text, 64, r.drop_per_layer, "total")
        assert r.reduction_ratio <= got <= r.reduction_ratio + 0.01 and r.flops_convention == "total"
    with pytest.raises(RecipeError, match="out of reach"):  # text tokens and layer 0 cannot be pruned away
        fit(model, samples, 0.95, progress=False)


def test_round_trip(random_setup, tmp_path):
    for r in random_setup[2]:
        r.save(tmp_path / "r.json")
        back = load_recipe(tmp_path / "r.json")
        assert back == r and back.to_json() == r.to_json()


def test_bisection_returns_least_alpha(random_setup):
    model, samples, recipes = random_setup
    stats = collect_statistics(model, samples, batch_size=4)
    for r in recipes:
        alpha, tol = r.provenance["alpha"], r.provenance["tol"]
        assert alpha >= tol and 5 <= r.provenance["bisection_rounds"] <= 8
        assert schedule_for(stats, simulate(model, stats, alpha, None, "visual_only"), r.reduction_ratio,
                            "visual_only") is not None
        prev = round(alpha - tol, 10)
        assert schedule_for(stats, simulate(model, stats, prev, None, "visual_only"), r.reduction_ratio,
                            "visual_only") is None, f"alpha {prev} also meets {r.reduction_ratio}"


def test_deterministic(random_setup):
    model, samples, recipes = random_setup
    again = fit(model, samples, [0.3, 0.6, 0.9], convention="visual_only", progress=False, batch_size=4)
    assert [r.to_json() for r in again] == [r.to_json() for r in recipes]
    single = fit(model, samples, 0.6, convention="visual_only", progress=False, batch_size=4)  # no shared cache
    assert single.to_json() == recipes[1].to_json()


def _uniform_schedule(shape, n_text, V, L, ratio, convention):
    """Equal drops per layer: the least d that meets `ratio`, the last layer trimmed like fit's."""
    def sched(d, last=None):
        out, left = [], V
        for _ in range(L):
            out.append(min(d, left))
            left -= out[-1]
        if last is not None:
            out[max(i for i, x in enumerate(out) if x)] = last
        return out
    meets = lambda s: reduction_for(shape, n_text, V, s, convention) >= ratio
    d = next(d for d in range(V + 1) if meets(sched(d)))
    s = sched(d)
    return sched(d, next(x for x in range(d + 1) if meets(sched(d, x)))) if any(s) else s


def _mean_kl(model, samples, recipe, selector):
    kls = []
    for s in samples:
        with torch.no_grad():
            model.set_pruning(None)
            dense = model(inputs_embeds=s.inputs_embeds, visual_mask=s.visual_mask).logits[0, -1].log_softmax(-1)
            model.set_pruning(recipe, selector)
            pruned = model(inputs_embeds=s.inputs_embeds, visual_mask=s.visual_mask).logits[0, -1].log_softmax(-1)
        kls.append(float((dense.exp() * (dense - pruned)).sum()))
    model.set_pruning(None)
    return sum(kls) / len(kls)


def test_planted_structure_fit_beats_uniform_and_random():
    model = tiny_lm(num_layers=6, seed=2, plant=True, name="llava-planted")
    calib, held_out = synth_samples(model, 8, seed=10, important=24), synth_samples(model, 8, seed=20, important=24)
    ratio, conv = 0.6, "visual_only"
    fitted = fit(model, calib, ratio, convention=conv, progress=False)
    shape, n_text = LMShape.from_config(model.config), calib[0].num_tokens - 64
    uniform = Recipe(_uniform_schedule(shape, n_text, 64, 6, ratio, conv), 64, ratio, flops_convention=conv)
    for r in (fitted, uniform):  # equal FLOPs: both meet the budget, within a token
        assert ratio <= reduction_for(shape, n_text, 64, r.drop_per_layer, conv) <= ratio + 0.01
    kl_fit = _mean_kl(model, held_out, fitted, FitPruneSelector())
    kl_uniform = _mean_kl(model, held_out, uniform, FitPruneSelector())
    kl_random = sum(_mean_kl(model, held_out, fitted, RandomSelector(seed)) for seed in range(3)) / 3
    assert kl_fit < kl_uniform and kl_fit < kl_random, (kl_fit, kl_uniform, kl_random, fitted.drop_per_layer,
                                                         uniform.drop_per_layer)


# -- bad inputs ---------------------------------------------------------------------------------------
def test_bad_ratios_and_empty_calibration(random_setup):
    model, samples, _ = random_setup
    for bad in (-0.1, 1.0, 60):
        with pytest.raises(RecipeError, match=r"outside \[0, 1\)"):
            fit(model, samples, bad, progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        fit(model, [], 0.5, progress=False)
    s = samples[0]
    no_image = CalibrationSample("x", s.inputs_embeds, torch.zeros_like(s.visual_mask), s.text_mask)
    with pytest.raises(CalibrationError, match="'x' has no visual tokens"):
        fit(model, [no_image], 0.5, progress=False)


def test_question_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="empty"):
        read_questions(str(empty))
    no_image = tmp_path / "text_only.jsonl"
    no_image.write_text(json.dumps({"question_id": 7, "text": "hi"}) + "\n")
    with pytest.raises(CalibrationError, match="question_id 7.*no image"):
        read_questions(str(no_image))
    with pytest.raises(CalibrationError, match="does not exist"):
        read_questions(str(tmp_path / "nope.jsonl"))
    qs = read_questions(os.path.join(TINY_CALIB, "questions.jsonl"))
    with pytest.raises(CalibrationError, match="--num-samples 12 or fewer"):
        sample_questions(qs, 66, 0)
    assert [q["question_id"] for q in sample_questions(qs, 4, 0)] == \
        [q["question_id"] for q in sample_questions(qs, 4, 0)]


def test_missing_image_names_the_file(tiny_gqa_dir, tmp_path):
    from llava_fitprune import load_pretrained_model
    from llava_fitprune.adapters.llava.calibration import build_calibration

    tokenizer, model, processor, _ = load_pretrained_model(tiny_gqa_dir, None, "llava-tiny-gqa", device="cpu")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "gone.png", "text": "What is it?"}) + "\n")
    with pytest.raises(CalibrationError, match=r"gone\.png"):
        build_calibration(model, tokenizer, processor, str(q), str(tmp_path), num_samples=1, progress=False)
    calib = build_calibration(model, tokenizer, processor, os.path.join(TINY_CALIB, "questions.jsonl"),
                              os.path.join(TINY_CALIB, "images"), num_samples=3, seed=0, progress=False)
    s = calib.samples[0]
    assert s.num_visual == 64 and bool(s.text_mask.any()) and not bool((s.text_mask & s.visual_mask).any())
    assert calib.meta["num_samples"] == 3 and len(calib.meta["question_file_sha256"]) == 64


# -- CLI, bundled data, calibration-set script --------------------------------------------------------
def test_cli_fit_and_dry_run(tiny_gqa_dir, tmp_path, capsys):
    from llava_fitprune.cli.fit import main

    out = tmp_path / "recipes"
    argv = ["--model-path", tiny_gqa_dir, "--question-file", os.path.join(TINY_CALIB, "questions.jsonl"),
            "--image-folder", os.path.join(TINY_CALIB, "images"), "--reduction-ratio", "0.3", "0.6", "0.9",
            "--num-samples", "4", "--seed", "1", "--out", str(out), "--device", "cpu",
            "--flops-convention", "visual_only", "--no-progress"]
    assert main(argv) == 0
    names = sorted(os.listdir(out))
    assert "visual_tokens_per_layer.png" in names and "fit_report.json" in names
    recipe_files = [out / n for n in names if n.endswith("visual_only.json")]
    recipes = [load_recipe(p) for p in recipe_files]
    assert sorted(r.reduction_ratio for r in recipes) == [0.3, 0.6, 0.9]
    for r in recipes:
        assert r.achieved_reduction >= r.reduction_ratio and r.provenance["seed"] == 1
        assert r.provenance["num_samples"] == 4 and r.provenance["conv_mode"] == "vicuna_v1"
    report = json.loads((out / "fit_report.json").read_text())
    assert {"statistics", "bisection 0.9"} <= set(report["phases"])
    capsys.readouterr()
    assert main(["--dry-run", "--recipe", str(recipe_files[0])]) == 0
    assert "meets it" in capsys.readouterr().out
    assert main(argv[:8] + ["60", "--out", str(out)]) == 2  # a bad ratio fails before loading the model
    assert "not 60" in capsys.readouterr().err


def test_tiny_bundle_is_reproducible(tmp_path):
    qs = read_questions(os.path.join(TINY_CALIB, "questions.jsonl"))
    assert len(qs) == 12
    script = os.path.join(ROOT, "eval_data", "calibration", "make_tiny.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path)], check=True, capture_output=True)
    for q in qs:
        a, b = (open(os.path.join(d, "images", q["image"]), "rb").read() for d in (TINY_CALIB, tmp_path))
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), q["image"]


def test_build_calibration_set_script(tmp_path):
    mix = [{"id": f"{i:06d}", "image": f"coco/train2017/{i:06d}.jpg",
            "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "a"}]}
           for i in range(50)]
    mix[3] = {"id": "text", "conversations": [{"from": "human", "value": "no image"}]}
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    script = os.path.join(ROOT, "scripts", "build_calibration_set.py")
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        subprocess.run([sys.executable, script, "--mix", str(tmp_path / "mix.json"), "--out", str(tmp_path / name),
                        "--seed", "3", "--num-samples", "5"], check=True, capture_output=True)
        outs.append((tmp_path / name).read_text())
    assert outs[0] == outs[1]
    lines = [json.loads(l) for l in outs[0].splitlines()]
    assert len(lines) == 5 and all(l["question_id"] != "text" for l in lines)
    assert all(l["text"].startswith("Question ") and "<image>" not in l["text"] for l in lines)
    assert [l["mix_index"] for l in lines] == sorted(l["mix_index"] for l in lines)


def test_statistics_match_eager_attention(random_setup):
    """W_cross / W_self from the runner equal those read off the stock eager attention maps."""
    model, samples, _ = random_setup
    stats = collect_statistics(model, samples[:2], batch_size=2)
    impl, model.config._attn_implementation = model.config._attn_implementation, "eager"  # causal mask built
    try:
        maps_per_sample = []
        for s in samples[:2]:
            with torch.no_grad():
                maps_per_sample.append(model.model(inputs_embeds=s.inputs_embeds, output_attentions=True).attentions)
    finally:
        model.config._attn_implementation = impl
    for i, (s, maps) in enumerate(zip(samples[:2], maps_per_sample)):  # maps: L x [1, H, N, N]
        vis, txt = s.visual_mask[0], s.text_mask[0]
        for l, a in enumerate(maps):
            m = a[0].amax(0)  # [N, N]
            assert abs(m[txt][:, vis].sum() / txt.sum() - stats.w_cross[i, l]) < 1e-5
            assert abs(m[vis][:, vis].sum() / vis.sum() - stats.w_self[i, l]) < 1e-5


# -- mixed visual-token counts (LLaVA-NeXT anyres) ----------------------------------------------------
ANYRES_SIZES = [(200, 100), (90, 170), (150, 150)]  # (width, height): three different visual-token counts


@pytest.fixture(scope="module")
def anyres_setup(tmp_path_factory):
    from PIL import Image

    from llava_fitprune import load_pretrained_model
    from llava_fitprune.adapters.llava.calibration import build_calibration
    from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

    root = tmp_path_factory.mktemp("anyres")
    path = build_tiny_llava(str(root / "llava-tiny-next"), TinyLlavaSpec(num_layers=3, image_size=112, anyres=True,
                                                                         seed=5))
    tok, model, proc, _ = load_pretrained_model(path, None, "llava-tiny-next", device="cpu")
    images, g = root / "images", torch.Generator().manual_seed(0)
    images.mkdir()
    questions = ["What is shown?", "Is there a red circle on the left?", "Count the objects.",
                 "Describe the picture in detail.", "What colour is the background?", "Where is the square?"]
    lines = []
    for i, q in enumerate(questions):
        w, h = ANYRES_SIZES[i % len(ANYRES_SIZES)]
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(images / f"{i}.png")
        lines.append(json.dumps({"question_id": i, "image": f"{i}.png", "text": q}))
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    calib = build_calibration(model, tok, proc, str(root / "q.jsonl"), str(images), num_samples=len(questions),
                              seed=0, progress=False)
    return tok, model, proc, calib, images, questions


def test_mixed_visual_counts_fit_and_apply(anyres_setup):
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    from llava_fitprune.adapters.llava.calibration import build_prompt

    tok, model, proc, calib, images, questions = anyres_setup
    counts = [s.num_visual for s in calib.samples]
    assert len(set(counts)) == 3, counts
    n_ref, shape = max(counts), LMShape.from_config(model.config)
    report = {}
    recipes = fit(model, calib, [0.3, 0.6], convention="visual_only", progress=False, batch_size=4, report=report)
    assert report["reference_visual_tokens"] == n_ref and sum(report["visual_token_counts"].values()) == 6
    for r in recipes:
        assert r.num_visual_tokens == n_ref and r.provenance["reference_visual_tokens"] == n_ref
        got = reduction_for(shape, r.provenance["reference_text_tokens"], n_ref, r.drop_per_layer, "visual_only")
        assert r.reduction_ratio <= got and r.achieved_reduction == round(got, 6) and r.total_dropped > 0
        by_count = report["budgets"][str(r.reduction_ratio)]["achieved_reduction_by_count"]
        assert set(by_count) == {str(n) for n in counts} and by_count[str(n_ref)] == r.achieved_reduction
        for i, (s, q) in enumerate(zip(calib.samples, questions)):  # apply to every calibration sample
            image = Image.open(images / f"{i}.png").convert("RGB")
            prompt = build_prompt(q, "vicuna_v1", getattr(model.config, "mm_use_im_start_end", False))
            ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
            model.set_pruning(r)
            try:
                with torch.no_grad():
                    model(ids, images=process_images([image], proc, model.config), image_sizes=[image.size])
            finally:
                model.set_pruning(None)
            entering = [v[0] for v in model.get_model().last_trace.visual_entering]
            assert entering[0] == s.num_visual
            assert [a - b for a, b in zip(entering, entering[1:])] == r.drops_for(s.num_visual)
    # samples of different lengths batched (right-padded, masked) give the one-by-one recipe
    assert fit(model, calib, 0.6, convention="visual_only", progress=False, batch_size=1).to_json() == \
        recipes[1].to_json()


def test_mixed_rounding_reduces_to_one_count_rule():
    """C_l over fractions of each sample's own count equals the integer rule when all counts are equal."""
    import random

    from llava_fitprune.core.fit_runner import cumulative_reference

    rng = random.Random(0)
    for _ in range(2000):
        S, N = rng.randint(1, 9), rng.randint(1, 50)
        cum = [rng.randint(0, N) for _ in range(S)]
        assert cumulative_reference(cum, [N] * S, N) == (2 * sum(cum) + S) // (2 * S)
    assert cumulative_reference([1, 2], [2, 4], 4) == 2  # both half-dropped: 0.5 * 4
    assert cumulative_reference([1, 0], [4, 2], 4) == 1  # mean fraction 1/8 of 4 = 0.5: half up


def test_single_count_recipes_unchanged(random_setup, anyres_setup):
    # the recipes the one-count fit gave before mixed counts were supported (same model, same samples)
    _, _, recipes = random_setup
    assert [list(r.drop_per_layer) for r in recipes] == [[10, 6, 4, 3], [24, 11, 6, 3], [50, 8, 2, 0]]
    assert [r.provenance["alpha"] for r in recipes] == [0.24, 0.46, 0.82]
    # an anyres set of one count: the recipe is for that count, deterministic
    _, model, _, calib, _, _ = anyres_setup
    same = [s for s in calib.samples if s.num_visual == calib.samples[0].num_visual]
    a, b = (fit(model, same, 0.5, convention="visual_only", progress=False, batch_size=bs) for bs in (1, 2))
    assert a.to_json() == b.to_json() and a.num_visual_tokens == same[0].num_visual


# -- few-stage schedules: max_pruning_layers ----------------------------------------------------------
def _cumulative(drops):
    out, run = [], 0
    for d in drops:
        run += d
        out.append(run)
    return out


def test_stage_schedule_is_the_least_flops_stage_set():
    """The DP's schedule equals the best of every set of at most K stage layers (brute force), and never
    runs ahead of the simulated cumulative drops."""
    import itertools
    import random

    from llava_fitprune.core.fit_stages import stage_schedule

    shape, rng = LMShape(6, 64, 128, 4, 4, 128), random.Random(0)
    for _ in range(40):
        V, T, drops = rng.randint(1, 80), rng.randint(1, 40), []
        for _ in range(6):
            drops.append(rng.randint(0, V - sum(drops)))
        C = _cumulative(drops)
        for conv, K in itertools.product(("total", "visual_only"), (1, 2, 3, 6)):
            got = stage_schedule(shape, T, V, drops, K, conv)
            assert sum(d > 0 for d in got) <= K and all(g <= c for g, c in zip(_cumulative(got), C))
            best = 0.0
            for P in (P for k in range(K + 1) for P in itertools.combinations(range(6), k)):
                s = [0] * 6
                for i, p in enumerate(P):
                    s[p] = C[p] - (C[P[i - 1]] if i else 0)
                best = max(best, reduction_for(shape, T, V, s, conv))
            assert reduction_for(shape, T, V, got, conv) == pytest.approx(best, abs=1e-12), (drops, K, conv)
            if K == 6:
                assert got == drops or reduction_for(shape, T, V, got, conv) == reduction_for(shape, T, V, drops, conv)


@pytest.fixture(scope="module")
def staged_setup(random_setup):
    model, samples, _ = random_setup
    return {K: fit(model, samples, [0.3, 0.6, 0.9], convention="visual_only", progress=False, batch_size=4,
                   max_pruning_layers=K) for K in (1, 2)}


def test_max_pruning_layers_caps_meets_budget_least_alpha(random_setup, staged_setup):
    from llava_fitprune.core.fit_stages import stage_schedule

    model, samples, unconstrained = random_setup
    stats = collect_statistics(model, samples, batch_size=4)
    shape, n_text = stats.shape, stats.num_text
    for K, recipes in staged_setup.items():
        for r, free in zip(recipes, unconstrained):
            p = r.provenance
            assert sum(d > 0 for d in r.drop_per_layer) <= K, (K, r.drop_per_layer)
            got = reduction_for(shape, n_text, 64, r.drop_per_layer, "visual_only")
            assert r.reduction_ratio <= got <= r.reduction_ratio + 0.02 and r.achieved_reduction == round(got, 6)
            assert p["max_pruning_layers"] == K and p["unconstrained_alpha"] == free.provenance["alpha"]
            assert p["unconstrained_pruning_layers"] == sum(d > 0 for d in free.drop_per_layer) > K
            assert p["alpha"] >= free.provenance["alpha"]
            full = simulate(model, stats, p["alpha"], None, "visual_only")  # never ahead of the alpha schedule
            assert all(g <= c for g, c in zip(_cumulative(r.drop_per_layer), _cumulative(full)))
            prev = round(p["alpha"] - p["tol"], 10)  # the least alpha: one grid step less misses
            sched = stage_schedule(shape, n_text, 64, simulate(model, stats, prev, None, "visual_only"), K,
                                   "visual_only")
            assert reduction_for(shape, n_text, 64, sched, "visual_only") < r.reduction_ratio, (K, prev)
    assert [r.drop_per_layer for r in staged_setup[1]] != [r.drop_per_layer for r in unconstrained]


def test_max_pruning_layers_not_binding_gives_the_unconstrained_recipe(random_setup):
    model, samples, unconstrained = random_setup
    keys = {"max_pruning_layers", "unconstrained_alpha", "unconstrained_pruning_layers"}
    for K in (4, 3):  # 4: every layer of this model; 3: the 0.9 recipe already prunes in 3 layers
        ratios = [0.3, 0.6, 0.9] if K == 4 else [0.9]
        got = fit(model, samples, ratios, convention="visual_only", progress=False, batch_size=4,
                  max_pruning_layers=K)
        for r, free in zip(got, unconstrained[-len(ratios):]):
            d = r.to_dict()
            assert {k: d["provenance"].pop(k) for k in keys} == {
                "max_pruning_layers": K, "unconstrained_alpha": free.provenance["alpha"],
                "unconstrained_pruning_layers": sum(x > 0 for x in free.drop_per_layer)}
            assert d == free.to_dict()
    assert "max_pruning_layers" not in unconstrained[0].provenance  # no cap: recipes as before


def test_max_pruning_layers_round_trip(staged_setup, tmp_path):
    for r in staged_setup[1]:
        r.save(tmp_path / "r.json")
        back = load_recipe(tmp_path / "r.json")
        assert back == r and back.to_json() == r.to_json() and back.provenance["max_pruning_layers"] == 1


def test_bad_max_pruning_layers(random_setup):
    model, samples, _ = random_setup
    for bad in (0, -1, 5, 2.5, True, "2"):
        with pytest.raises(RecipeError, match=r"max_pruning_layers must be a whole number from 1 to 4 .*got"):
            fit(model, samples, 0.5, progress=False, max_pruning_layers=bad)


def test_cap_that_cannot_meet_the_budget_names_k(random_setup, monkeypatch):
    """A simulation whose drops are spread over every layer: the unconstrained schedule meets the budget,
    no one-stage schedule under it does; the error names K and the fix."""
    import llava_fitprune.core.fit as fit_module

    model, samples, _ = random_setup
    spread = [16, 16, 16, 16]
    shape, n_text = LMShape.from_config(model.config), samples[0].num_tokens - samples[0].num_visual
    one_stage = max(reduction_for(shape, n_text, 64, [spread[0] * (l + 1) if i == l else 0 for i in range(4)],
                                  "visual_only") for l in range(4))
    ratio = round((one_stage + reduction_for(shape, n_text, 64, spread, "visual_only")) / 2, 3)
    monkeypatch.setattr(fit_module, "simulate", lambda *a, **k: list(spread))
    assert fit(model, samples, ratio, convention="visual_only", progress=False).drop_per_layer != [0] * 4
    with pytest.raises(RecipeError, match=rf"at most 1 pruning layers \(max_pruning_layers=1\) meets reduction_ratio "
                                          rf"{ratio}.*raise --max-pruning-layers or lower the ratio"):
        fit(model, samples, ratio, convention="visual_only", progress=False, max_pruning_layers=1)


def test_cli_max_pruning_layers(tiny_gqa_dir, tmp_path, capsys):
    from llava_fitprune.cli.fit import main

    out = tmp_path / "recipes"
    argv = ["--model-path", tiny_gqa_dir, "--question-file", os.path.join(TINY_CALIB, "questions.jsonl"),
            "--image-folder", os.path.join(TINY_CALIB, "images"), "--reduction-ratio", "0.8",
            "--num-samples", "4", "--seed", "1", "--out", str(out), "--device", "cpu",
            "--flops-convention", "visual_only", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:  # an argument error, before loading the model
        main(argv + ["--max-pruning-layers", "0"])
    assert exit_info.value.code == 2 and "--max-pruning-layers 0: must be >= 1" in capsys.readouterr().err
    assert main(argv + ["--max-pruning-layers", "4"]) == 2  # the model has 3 layers
    assert "from 1 to 3" in capsys.readouterr().err and not list(out.glob("*.json"))
    assert main(argv + ["--max-pruning-layers", "1"]) == 0
    r = load_recipe(out / "llava-tiny-gqa-fitprune-r0.8-visual_only-k1.json")
    assert r.provenance["max_pruning_layers"] == 1 and sum(d > 0 for d in r.drop_per_layer) == 1
    assert r.achieved_reduction >= 0.8
