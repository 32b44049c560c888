"""The fast path (static per-layer KV cache, fixed-shape decode step) equals the eager path.

fp32 on the CPU: the same dropped tokens, the same greedy tokens and logits within 1e-5, batched
(padded) and one by one, first turn and a cached second turn, for every method and dense.
"""
import os

import pytest
import torch

from llava_fitprune import OracleSelector, Recipe
from llava_fitprune.adapters.llava.fast_path import disable_fast_path, enable_fast_path, graph_key
from llava_fitprune.adapters.llava.static_cache import StaticPrunedCache
from .conftest import batch_ids, image_tensor, load_ours, prompt_ids
from .test_equivalence import QUESTIONS, RECIPE4

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "dense": {},
    "fitprune": dict(recipe=RECIPE4),
    "random": dict(recipe=RECIPE4, method="random"),
    "fastv": dict(recipe=RECIPE4, method="fastv"),
    "uniform": dict(recipe=RECIPE4, method="uniform"),
    "oracle": dict(recipe=RECIPE4),  # FitPrune's own choices replayed (OracleSelector)
}
NEW = 4
TOL = dict(atol=1e-5, rtol=1e-5)
SLOW = os.environ.get("LLAVA_FITPRUNE_SLOW") == "1"
BACKEND = "eager"  # torch.compile backend of the compile test: dynamo (fullgraph) without codegen, fast


@pytest.fixture(scope="module")
def models(tiny_dir):
    loaded = {}

    def get(method):
        if method not in loaded:
            loaded[method] = load_ours(tiny_dir, **METHODS[method])[:2]
        return loaded[method]
    return get


def _gen(model, ids, images, **kw):
    out = model.generate(ids, images=images, max_new_tokens=NEW, do_sample=False, use_cache=True,
                         return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences, torch.stack(out.scores, 1), out


def _embeds(model, ids, images):
    """(inputs_embeds [1, N, D], visual_mask [1, N]) of one prompt with its image."""
    out = model.prepare_multimodal(ids, None, None, None, None, images)
    return out[4], out[6]


def _dropped(model):
    return [d if d is None else d.tolist() for d in model.last_trace.dropped_positions]


def _eager_and_fast(model, run, **fast_kw):
    """run() on the eager path, then on the fast path (turned off again afterwards)."""
    disable_fast_path(model)
    eager = run()
    enable_fast_path(model, **fast_kw)
    try:
        return eager, run()
    finally:
        disable_fast_path(model)


def _selector_kw(method, model, ids, images, **kw):
    if method != "oracle":
        return {}
    model(ids, images=images, **kw)  # FitPrune's choices for these inputs
    return dict(selector=OracleSelector(model.last_trace.dropped_positions))


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fast_first_turn_equals_eager_batched_and_one_by_one(models, method):
    tok, model = models(method)
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    cases = [(ids, images, dict(attention_mask=mask))]  # padded batch
    cases += [(prompt_ids(tok, q)[None], images[i:i + 1], {}) for i, q in enumerate(QUESTIONS)]
    for x, img, kw in cases:
        kw = {**kw, **_selector_kw(method, model, x, img, **kw)}

        def run():
            seq, scores, out = _gen(model, x, img, **kw)
            return seq, scores, out.past_key_values, _dropped(model)
        (seq_e, scores_e, cache_e, drop_e), (seq_f, scores_f, cache_f, drop_f) = _eager_and_fast(model, run)
        assert isinstance(cache_f, StaticPrunedCache) and not isinstance(cache_e, StaticPrunedCache)
        assert drop_f == drop_e
        assert seq_f.tolist() == seq_e.tolist()
        torch.testing.assert_close(scores_f, scores_e, **TOL)
        assert cache_f.layer_lengths() == cache_e.layer_lengths()
        for kf, ke in zip(cache_f.key_cache, cache_e.key_cache):
            torch.testing.assert_close(kf, ke, **TOL)
        assert [m.tolist() for m in cache_f.key_masks] == [m.tolist() for m in cache_e.key_masks]


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fast_second_turn_equals_eager(models, method):
    tok, model = models(method)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(4, 336)
    turn2 = tok(" USER: and the square? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    kw = _selector_kw(method, model, ids, images)

    def run():
        seq1, _, out1 = _gen(model, ids, images, **kw)
        cache = out1.past_key_values
        new = torch.cat([seq1[:, -1:], turn2], dim=1)  # the last answer token was never fed to the model
        mask = torch.ones(1, cache.seen_tokens + new.shape[1])  # the cached tokens and the new ones
        out2 = model.generate(new, past_key_values=cache, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, output_scores=True)
        return seq1, out2.sequences, torch.stack(out2.scores, 1), cache
    (s1_e, s2_e, scores_e, cache_e), (s1_f, s2_f, scores_f, cache_f) = _eager_and_fast(model, run)
    assert isinstance(cache_f, StaticPrunedCache)
    assert s1_f.tolist() == s1_e.tolist() and s2_f.tolist() == s2_e.tolist()
    torch.testing.assert_close(scores_f, scores_e, **TOL)
    assert cache_f.layer_lengths() == cache_e.layer_lengths()


@torch.no_grad()
def test_static_cache_holds_each_layers_pruned_length_plus_new_tokens(models):
    tok, model = models("fitprune")
    ids, images = prompt_ids(tok, QUESTIONS[1])[None], image_tensor(1, 336)
    fast = enable_fast_path(model, bucket=1)
    try:
        embeds, visual = _embeds(model, ids, images)
        cache = fast.prefill(NEW, inputs_embeds=embeds, visual_mask=visual).past_key_values
        assert cache.capacities() == [n + NEW for n in cache.layer_lengths()]
        assert cache.layer_lengths() == model.last_trace.tokens_entering[:-1]
        assert cache.layer_lengths()[-1] < cache.layer_lengths()[0]  # pruned layers hold less
        dense_bytes = cache.key_buffers[0].nbytes * 2 * len(cache)
        assert cache.capacity_bytes() < dense_bytes
    finally:
        disable_fast_path(model)


@torch.no_grad()
@pytest.mark.parametrize("decode, reserved", [("eager", 1), ("compile", 4)])
def test_fast_decode_steps_equal_eager(models, decode, reserved):
    """fast.decode steps equal the eager loop's. eager: past the reserved room, the buffers grow.
    compile: the layer step under torch.compile (fullgraph: no graph break), compiled once for all
    layers, whose cache capacities differ (a dynamic size, not one graph per capacity)."""
    from torch._dynamo.utils import counters

    tok, model = models("fitprune")
    ids, images = prompt_ids(tok, QUESTIONS[2])[None], image_tensor(2, 336)
    embeds, visual = _embeds(model, ids, images)
    eager = model(inputs_embeds=embeds, visual_mask=visual, use_cache=True)
    fast = enable_fast_path(model, decode=decode, backend=BACKEND, bucket=1)
    graphs = int(counters["stats"]["unique_graphs"])
    try:
        out = fast.prefill(reserved, inputs_embeds=embeds, visual_mask=visual)
        torch.testing.assert_close(out.logits, eager.logits, **TOL)
        cache, logits_e, eager_cache = out.past_key_values, eager.logits[:, -1:], eager.past_key_values
        room = cache.capacities()
        assert room == [n + reserved for n in cache.layer_lengths()]
        for _ in range(3):
            nxt = logits_e.argmax(-1)  # [B, 1]
            logits_f = fast.decode(nxt, None, cache)
            step = model(input_ids=nxt, past_key_values=eager_cache, use_cache=True)  # eager: no session
            logits_e, eager_cache = step.logits, step.past_key_values
            torch.testing.assert_close(logits_f, logits_e, **TOL)
        assert cache.layer_lengths() == eager_cache.layer_lengths()
        grew = [c > r for c, r in zip(cache.capacities(), room)]
        assert all(grew) if reserved < 3 else not any(grew)
        assert (fast.stats["decode_compile_s"] > 0) == (decode == "compile")
        assert len(set(room)) > 1 and int(counters["stats"]["unique_graphs"]) - graphs <= 1
    finally:
        disable_fast_path(model)


def _step_key(fast, cache):
    """The CUDA graph key (fast_path.graph_key) of `cache`'s next decode step."""
    cos, sin = fast._rotary(cache.seen_tokens + 2, cache.key_buffers[0].dtype, cache.key_buffers[0].device)
    ids = torch.zeros(cache.key_buffers[0].shape[0], 1, dtype=torch.long)
    return graph_key(ids, (cache.key_buffers, cache.value_buffers, cache.mask_buffers, cache.prepare_step(), cos, sin))


def test_fast_path_is_per_instance(models, tiny_dir):
    _, model = models("fitprune")
    _, other = load_ours(tiny_dir)[:2]
    cls_forward = type(model).forward
    enable_fast_path(model)
    try:
        assert "forward" in model.__dict__ and "forward" not in other.__dict__
        assert type(model).forward is cls_forward and not hasattr(other, "fast_path")
    finally:
        disable_fast_path(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "fast_path")
    with pytest.raises(TypeError, match="needs the pruning model"):
        enable_fast_path(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs a CUDA model"):
        enable_fast_path(model, decode="graph")
    with pytest.raises(ValueError, match="prefill must be one of"):
        enable_fast_path(model, prefill="fast")
    assert enable_fast_path(model).prefill_mode == "eager"  # auto on the CPU (fast_path.PREFILL_AUTO)
    disable_fast_path(model)


@torch.no_grad()
def test_fast_path_with_grouped_query_attention(tiny_gqa_dir):
    """4 query heads over 2 key/value heads: the static step (SDPA's enable_gqa) equals the eager loop."""
    tok, model, _, _ = load_ours(tiny_gqa_dir)
    n_layers, n_visual = len(model.get_model().layers), model.get_vision_tower().num_patches
    model.set_pruning(Recipe([n_visual // 4] * (n_layers - 1) + [0], num_visual_tokens=n_visual))
    ids, images = prompt_ids(tok, QUESTIONS[2])[None], image_tensor(2, model.get_vision_tower().config.image_size)
    (seq_e, scores_e, _), (seq_f, scores_f, out_f) = _eager_and_fast(model, lambda: _gen(model, ids, images))
    assert isinstance(out_f.past_key_values, StaticPrunedCache)
    assert seq_f.tolist() == seq_e.tolist()
    torch.testing.assert_close(scores_f, scores_e, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("method", ["dense", "fitprune"] + [
    pytest.param(m, marks=pytest.mark.skipif(not SLOW, reason="a compilation each: LLAVA_FITPRUNE_SLOW=1"))
    for m in ("random", "fastv", "uniform", "oracle")])
def test_compiled_prefill_into_the_static_cache_equals_eager(models, method):
    """prefill="compile": the layer loop under torch.compile (aot_eager: dynamo with fullgraph, then
    AOT autograd's functionalized writes into the static cache's buffers) fills the same cache and
    gives the same drops, tokens and logits as the eager path, batched and one by one, and a cached
    second turn continues from it alike. One graph for the padded batch, one for every batch-1
    prompt length; the model's own forward (off the fast path) stays eager."""
    tok, model = models(method)
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    cases = [(ids, images, dict(attention_mask=mask))]  # padded batch
    cases += [(prompt_ids(tok, q)[None], images[i:i + 1], {}) for i, q in enumerate(QUESTIONS)]
    turn2 = tok(" USER: and the square? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids

    def run():
        out = []
        for x, img, kw in cases:
            kw = {**kw, **_selector_kw(method, model, x, img, **kw)}
            seq, scores, gen = _gen(model, x, img, **kw)
            cache = gen.past_key_values
            lengths, masks = cache.layer_lengths(), [m.tolist() for m in cache.key_masks]
            keys = [k.clone() for k in cache.key_cache]
            new = torch.cat([seq[:, -1:], turn2.expand(seq.shape[0], -1)], dim=1)
            full = torch.cat([cache.key_masks[0].long(), torch.ones_like(new)], dim=1)
            seq2, scores2, _ = _gen(model, new, None, past_key_values=cache, attention_mask=full)
            out.append((seq, scores, lengths, masks, keys, _dropped(model), seq2, scores2, type(cache)))
        return out

    disable_fast_path(model)
    eager = run()
    fast = enable_fast_path(model, prefill="compile", prefill_backend="aot_eager")
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled = run()
        stats = fast.compiled_prefill.stats
        assert stats.calls == len(cases)  # every first turn's prefill ran compiled
        assert stats.compiling_calls <= 2, stats  # none when an earlier test compiled the same graphs
        model(*cases[1][:1], images=cases[1][1])  # off the fast path: the eager loop
        assert stats.calls == len(cases)
    finally:
        disable_fast_path(model)
    for e, c in zip(eager, compiled):
        assert c[-1] is StaticPrunedCache and e[-1] is not StaticPrunedCache
        assert c[0].tolist() == e[0].tolist() and c[6].tolist() == e[6].tolist()  # first and second turn
        torch.testing.assert_close(c[1], e[1], **TOL)
        torch.testing.assert_close(c[7], e[7], **TOL)
        assert c[2] == e[2] and c[3] == e[3] and c[5] == e[5]  # cache lengths, key masks, drops
        for kc, ke, real in zip(c[4], e[4], c[3]):  # the real tokens' keys (a padded batch's fill rows may differ)
            real = torch.tensor(real)  # [B, K_l]
            torch.testing.assert_close(kc.transpose(1, 2)[real], ke.transpose(1, 2)[real], **TOL)
