"""Every method in the FitPrune harness: FLOPs targets, batching, caching, FastV's semantics, LVPruning."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from llava_fitprune import OracleSelector, Recipe, builtin_recipe
from llava_fitprune.core.flops import NAMED_SHAPES, LMShape
from llava_fitprune.lvprune import LVPruneConfig, LVPruneModules, attach, detach
from llava_fitprune.lvprune.data import make_dataset
from llava_fitprune.lvprune.masking import masked_forward
from llava_fitprune.lvprune.train import main as train_main, parse_args, train
from llava_fitprune.core.method_flops import lvprune_module_flops, method_flops
from llava_fitprune.core.methods import METHODS, build_method, fastv_drops, uniform_drops
from llava_fitprune.core.selectors import LayerAttention, PruneState, RandomSelector
from .conftest import batch_ids, image_tensor, load_ours, prompt_ids

QUESTIONS = ["What is the colour of the circle?", "Is the red square left of the blue star? Answer yes or no."]
RECIPE4 = Recipe([100, 150, 100, 50], num_visual_tokens=576)  # the FitPrune reference on the 4-layer model
NEW_TOKENS = 4
TEXT_7B = 65  # prompt text tokens: 35 before the image + 30 after (the flops CLI defaults)


SPREAD_STD = 0.3  # untrained modules with spread-out weights: keep logits far from ties (fp noise can't flip them)


def _modules(hidden=64, layers=4, seed=0, **kw):
    torch.manual_seed(seed)
    modules = LVPruneModules(LVPruneConfig(hidden_size=hidden, num_layers=layers, width=32, **kw))
    with torch.no_grad():
        for p in modules.parameters():
            p.normal_(0.0, SPREAD_STD)
    return modules


def _build(method, model, n_text):
    options = {"modules": _modules()} if method == "lvprune" else {}
    recipe = None if method == "lvprune" else RECIPE4
    return build_method(method, recipe=recipe, model=model, num_text_tokens=n_text, num_visual_tokens=576, **options)


# -- FLOPs targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "uniform"])
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9])
def test_equal_flops_meets_the_budget_by_less_than_a_token(method, ratio):
    shape, ref = NAMED_SHAPES["llava-v1.5-7b"], builtin_recipe(ratio)
    recipe, _ = build_method(method, reduction_ratio=ratio, shape=shape, num_text_tokens=TEXT_7B)
    budget = method_flops(shape, ref, TEXT_7B, 576).total
    spent = method_flops(shape, recipe, TEXT_7B, 576).total
    assert recipe.method == method and spent <= budget
    # one token less dropped would overspend
    if method == "fastv":
        k = recipe.drop_per_layer.index(max(recipe.drop_per_layer)) + 1
        looser = fastv_drops(32, k, recipe.total_dropped - 1)
    else:
        looser = uniform_drops(32, recipe.provenance["uniform_rate_total"] - 1, 576)
    assert method_flops(shape, Recipe(looser, 576), TEXT_7B, 576).total > budget
    assert recipe.achieved_reduction == pytest.approx(1 - spent / method_flops(shape, None, TEXT_7B, 576).dense, abs=1e-6)


def test_target_reduction_and_other_methods_flops():
    shape = NAMED_SHAPES["llava-v1.5-7b"]
    fastv, _ = build_method("fastv", shape=shape, num_text_tokens=TEXT_7B, num_visual_tokens=576, target_reduction=0.4)
    assert method_flops(shape, fastv, TEXT_7B, 576).reduction >= 0.4
    ref = builtin_recipe(0.6)
    fit, _ = build_method("fitprune", reduction_ratio=0.6, shape=shape)
    rnd, sel = build_method("random", reduction_ratio=0.6, shape=shape, seed=3)
    assert fit.drop_per_layer == rnd.drop_per_layer == ref.drop_per_layer and rnd.method == "random" and sel.seed == 3
    lv_cfg = LVPruneConfig(hidden_size=4096, num_layers=32)  # defaults: layers 2, 8, 16; keep .5, .25, .1
    lv = lv_cfg.recipe(576)
    f = method_flops(shape, lv, TEXT_7B, 576, lv_cfg)
    assert lv.visual_tokens_entering()[3] == 288 and lv.visual_tokens_entering()[17] == 58
    assert f.extra == sum(lvprune_module_flops(4096, 256, n, TEXT_7B) for n in (576, 288, 144))
    assert 0 < f.extra < 1e-3 * f.dense and f.reduction == pytest.approx(1 - (f.language_model + f.extra) / f.dense)
    with pytest.raises(ValueError, match="cannot meet the budget"):
        build_method("fastv", shape=shape, num_text_tokens=TEXT_7B, num_visual_tokens=576, k=32, target_reduction=0.5)
    with pytest.raises(ValueError, match="num_text_tokens"):
        build_method("uniform", reduction_ratio=0.6, shape=shape)


# -- FastV's semantics ------------------------------------------------------------------------
def test_fastv_defaults_on_a_hand_made_attention_map():
    recipe, selector = build_method("fastv", shape="llava-v1.5-7b", num_visual_tokens=576)
    assert list(recipe.drop_per_layer) == [0, 288] + [0] * 30  # K=2: absent from layer 2 on, R=50%
    # 2 samples, 12 positions: text 0-1, visual 2-9, text 10-11; sample 1 is right-padded at 11.
    B, H, N, r0 = 2, 2, 12, 2
    visual = torch.zeros(B, N, dtype=torch.bool)
    visual[:, 2:10] = True
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 11] = False
    probs = torch.zeros(B, H, N - r0, N)
    probs[:, :, : N - r0 - 2, 2:10] = torch.linspace(1, 0, 8)  # earlier rows favour other tokens: ignored
    last = torch.tensor([[0.9, 0.0, 0.3, 0.1, 0.6, 0.0, 0.2, 0.4],  # head 0 of the last prompt token
                         [0.0, 0.5, 0.3, 0.0, 0.0, 0.7, 0.0, 0.1]])  # head 1: means .45 .25 .3 .05 .3 .35 .1 .25
    probs[0, :, N - 1 - r0, 2:10] = last
    probs[1, :, N - 2 - r0, 2:10] = last.flip(-1)  # sample 1's last real token is 10
    probs[1, :, N - 1 - r0, 2:10] = last  # its padding row must not count
    state = PruneState(visual=visual, text_after=valid & ~visual, valid=valid,
                       orig_pos=torch.arange(N).expand(B, N), row_start=r0, drop_counts=[], new_lens=[])
    n_drop = recipe.drops_for(8)[1]
    assert n_drop == 4
    drop = selector.drop_mask(1, LayerAttention(probs, r0), state, torch.zeros(B, N, 1),
                              torch.tensor([n_drop, n_drop]), n_drop)
    # lowest head-mean: .05 (5), .1 (8), then .25 twice (3, 9); head-max would drop 4, 5, 8, 9
    assert drop[0].nonzero().flatten().tolist() == [3, 5, 8, 9]
    assert drop[1].nonzero().flatten().tolist() == [2, 3, 6, 8]  # mirrored map, read from row 10


def test_random_selector_is_seeded_and_positional():
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[0, 2:8] = visual[1, 4:10] = True
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :2] = False  # sample 1 = sample 0 left-padded by 2
    state = PruneState(visual, valid & ~visual, valid, torch.arange(10).expand(2, 10), 2, [], [])
    imp = RandomSelector(seed=1).importance(3, None, state, None)
    assert torch.equal(imp, RandomSelector(seed=1).importance(3, None, state, None))
    assert torch.equal(imp[0, 2:8], imp[1, 4:10])  # position within the sample, not in the batch
    assert not torch.equal(imp, RandomSelector(seed=2).importance(3, None, state, None))


# -- batching and caching, every method ------------------------------------------------------------
def _gen(model, ids, images, **kw):
    out = model.generate(ids, images=images, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         use_cache=True, return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences[:, -NEW_TOKENS:], torch.stack(out.scores, 1)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_ours(tiny_dir)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_batched_and_cached_decoding(tiny_model, method):
    tok, model, _, _ = tiny_model
    n_text = prompt_ids(tok, QUESTIONS[0]).shape[0] - 1
    recipe, selector = _build(method, model, n_text)
    assert recipe.method == method
    model.set_pruning(recipe, selector)
    images = torch.cat([image_tensor(10 + i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    seq_b, scores_b = _gen(model, ids, images, attention_mask=mask)
    for i, q in enumerate(QUESTIONS):
        one = prompt_ids(tok, q)[None]
        seq_1, scores_1 = _gen(model, one, images[i:i + 1])
        flops = method_flops(LMShape.from_config(model.config), recipe, one.shape[1] - 1, 576)
        assert model.last_trace.tokens_entering == flops.schedule  # the FLOPs model's schedule is what ran
        assert seq_b[i].tolist() == seq_1[0].tolist(), f"sample {i}"
        torch.testing.assert_close(scores_b[i], scores_1[0], atol=1e-4, rtol=1e-4)
        # cached decoding = recomputing prompt + generated tokens with the prefill's drops replayed
        oracle = OracleSelector(model.get_model().last_trace.dropped_positions)
        full = torch.cat([one, seq_1[:, :-1]], dim=1)
        logits = model(full, images=images[i:i + 1], selector=oracle, use_cache=False).logits[:, -NEW_TOKENS:]
        assert logits.argmax(-1).tolist() == seq_1.tolist()
        shown = torch.isfinite(scores_1)  # min_new_tokens sets the EOS score to -inf
        torch.testing.assert_close(logits[shown], scores_1[shown], atol=1e-4, rtol=1e-4)
    model.set_pruning(None)


# -- LVPruning ------------------------------------------------------------------------------------
@torch.no_grad()
def test_lvprune_indexing_reproduces_masked_training_forward(tiny_model, tmp_path):
    tok, model, _, _ = tiny_model
    model.set_pruning(None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    modules = _modules(seed=1)
    ids, mask = batch_ids(tok, QUESTIONS)
    images = torch.cat([image_tensor(20 + i, 336) for i in range(2)])
    masked, hook = masked_forward(model, modules, ids, images, attention_mask=mask, mode="topk")
    modules.save(str(tmp_path))
    loaded = LVPruneModules.load(str(tmp_path))  # the round trip: same tensors, same decisions
    assert all(torch.equal(a, b) for a, b in zip(modules.state_dict().values(), loaded.state_dict().values()))
    recipe = attach(model, str(tmp_path))
    indexed = model(ids, attention_mask=mask, images=images).logits
    trace = model.last_trace
    detach(model)
    assert recipe.method == "lvprune" and list(recipe.drop_per_layer) == [288, 144, 86, 0]  # keep .5, .25, .1 of 576
    assert trace.visual_entering[-1] == [58, 58]
    for b in range(2):
        rows = trace.final_positions[b][trace.final_valid[b]]
        torch.testing.assert_close(indexed[b][trace.final_valid[b]], masked.logits[b, rows], atol=1e-4, rtol=1e-4)
        dropped = torch.cat([d[b][d[b] >= 0] for d in trace.dropped_positions if d is not None])
        assert sorted(dropped.tolist()) == (hook.policy[b] == 0).nonzero().flatten().tolist()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # attach/detach: no weight change


def _write_dataset(folder, n=8):
    rng = np.random.default_rng(0)
    os.makedirs(folder / "images", exist_ok=True)
    qa = [("What is the colour of the circle?", "red"), ("How many shapes are there?", "three"),
          ("Describe this photo.", "a red circle and a blue square"), ("Is the square left of the star?", "yes")]
    data = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        q, a = qa[i % len(qa)]
        data.append({"id": str(i), "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (folder / "train.json").write_text(json.dumps(data))
    return folder / "train.json", folder / "images"


def _argv(data, images, out, steps, save_steps):
    return ["--data-path", str(data), "--image-folder", str(images), "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", "2", "--width", "16", "--layers", "0,1", "--keep", "0.3,0.1", "--init-keep", "0.45",
            "--lr", "1e-2", "--ratio-weight", "10", "--warmup-ratio", "0", "--log-steps", "10",
            "--save-steps", str(save_steps), "--quiet"]


def test_lvprune_training_lowers_loss_reaches_keep_and_leaves_weights(tiny_gqa_dir, tmp_path):
    data, images = _write_dataset(tmp_path)
    tok, model, processor, _ = load_ours(tiny_gqa_dir)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    args = parse_args(["--model-path", tiny_gqa_dir] + _argv(data, images, tmp_path / "out", 20, 100))
    torch.manual_seed(args.seed)  # the modules train() starts from
    initial = LVPruneModules(LVPruneConfig(hidden_size=64, num_layers=3, layers=args.layers, keep=args.keep,
                                           width=args.width), init_keep=args.init_keep)
    modules = train(args, tok, model, processor)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # frozen, bit-identical
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    # the inference rule (hard top-k, the recipe's counts) chooses tokens that lose less after training
    dataset, collator = make_dataset(str(data), str(images), tok, processor, model.config)
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        lm = [masked_forward(model, m, batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"],
                             mode="topk")[0].loss for m in (initial, modules)]
    assert lm[1] < lm[0]
    assert log[-1]["keep"] == pytest.approx([0.3, 0.1], abs=0.05)  # targets; training started at .45, .2
    assert log[-1]["ratio_loss"] < log[0]["ratio_loss"] / 2
    reloaded = LVPruneModules.load(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(modules.state_dict().values(), reloaded.state_dict().values()))
    recipe = Recipe.from_dict(json.loads((tmp_path / "out" / "lvprune_recipe.json").read_text()))
    assert recipe.method == "lvprune" and recipe.visual_tokens_entering()[1:3] == [19, 6]  # of 64


def test_zero2_config_is_resolved_like_hf_trainer():
    from llava_fitprune.lvprune.engine import resolve_deepspeed_config

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "zero2.json")
    cfg = resolve_deepspeed_config(path, micro_batch=4, grad_accum=2, world=8, hidden_size=4096,
                                   dtype=torch.bfloat16, max_grad_norm=1.0)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 2, 64)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["reduce_bucket_size"] == 4096 ** 2


def test_lvprune_modules_initialise_despite_global_torch_state(monkeypatch):
    """fp32 whatever the default dtype; every tensor set although LLaVA's disable_torch_init() stubs
    Linear/LayerNorm.reset_parameters for the whole process (LLaVA's eval and serve scripts call it)."""
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.LayerNorm, "reset_parameters", lambda self: None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # as a model load that failed half-way can leave it
    try:
        torch.manual_seed(0)
        stubbed = LVPruneModules(LVPruneConfig(hidden_size=64, num_layers=4, width=32))
    finally:
        torch.set_default_dtype(default)
    monkeypatch.undo()
    torch.manual_seed(0)
    normal = LVPruneModules(LVPruneConfig(hidden_size=64, num_layers=4, width=32))
    assert {p.dtype for p in stubbed.parameters()} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(stubbed.state_dict().values(), normal.state_dict().values()))


def test_builder_wires_every_method(tiny_dir):
    """`load_pretrained_model(method=...)` gives the method's schedule and selector."""
    from .conftest import load_ours

    for method, kw, name in [("fastv", {"method_options": {"k": 2, "r": 0.5}}, "fastv"),
                             ("uniform", {"recipe": Recipe([100, 200, 50, 0], 576)}, "uniform"),
                             ("random", {"recipe": Recipe([100, 200, 50, 0], 576)}, "random")]:
        _, model, _, _ = load_ours(tiny_dir, method=method, **kw)
        assert model.get_model().selector.name == name and model.recipe is not None
