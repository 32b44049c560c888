"""Exactness of the transformers-native backend on tiny llava-hf, LLaVA-NeXT and Qwen2.5-VL models (fp32 CPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import MODELS, generate, kept_after_layers, load_ours, load_stock, make_inputs
from llava_fitprune.core.recipe import Recipe, zero_recipe
from llava_fitprune.core.selectors import OracleSelector
from reference_hf import reference_fitprune

# drops at layer 0 and in the middle, none at the last layer; scaled to each sample's visual count
RECIPE = Recipe([10, 20, 5, 0], num_visual_tokens=64)
NEW = 4


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_zero_recipe_equals_stock(tiny_paths, name, attn):
    """Our decoder loop with nothing to drop (padded batch of two) gives the stock model's logits and tokens."""
    stock = load_stock(tiny_paths[name], attn)
    model, processor = load_ours(tiny_paths[name], attn, recipe=zero_recipe(4, 64))
    inputs = make_inputs(processor, [0, 1])
    assert bool((inputs["attention_mask"] == 0).any()), "the batch should be padded"
    assert torch.equal(model(**inputs).logits, stock(**inputs).logits)
    ours, stock_out = generate(model, inputs, NEW), generate(stock, inputs, NEW)
    assert torch.equal(ours[0], stock_out[0])
    assert torch.equal(ours[1], stock_out[1])
    assert model.fitprune_last.visual_tokens == (inputs["input_ids"] == stock.config.image_token_id).sum(-1).tolist()


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_kept_tokens_equal_reference(tiny_paths, name):
    """At every layer FitPrune keeps the tokens of the plain re-implementation; greedy tokens and logits agree."""
    stock = load_stock(tiny_paths[name], "eager")
    model, processor = load_ours(tiny_paths[name], recipe=RECIPE)
    for sample in (0, 1):
        inputs = make_inputs(processor, [sample])
        image_token = stock.config.image_token_id  # the stock config's, not ours: the reference is independent
        n_visual = int((inputs["input_ids"] == image_token).sum())
        assert n_visual > 0
        drops = RECIPE.drops_for(n_visual)
        kept, kv_lengths, tokens, logits = reference_fitprune(stock, inputs, image_token, drops, NEW)
        ours, our_logits = generate(model, inputs, NEW)
        N = inputs["input_ids"].shape[1]
        assert kept_after_layers(model.fitprune_trace, N) == kept
        assert ours[0].tolist() == tokens
        torch.testing.assert_close(our_logits[0], logits, atol=1e-4, rtol=1e-4)
        assert model.fitprune_last.visual_tokens_kept == [n_visual - sum(drops)]
        assert [len(k) for k in kept][-1] == N - sum(drops)
        assert kv_lengths == [N] + [len(k) for k in kept[:-1]]  # a layer caches the tokens entering it


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_batched_equals_one_by_one(tiny_paths, name):
    """A left-padded batch of two prompts with different visual-token counts drops, per sample, the
    tokens each drops alone, and generates the same tokens."""
    model, processor = load_ours(tiny_paths[name], recipe=RECIPE)
    batch = make_inputs(processor, [0, 1])
    tokens, logits = generate(model, batch, NEW)
    N = batch["input_ids"].shape[1]
    batched_trace = model.fitprune_trace
    for b in (0, 1):
        alone = make_inputs(processor, [b])
        pad = N - alone["input_ids"].shape[1]
        alone_tokens, alone_logits = generate(model, alone, NEW)
        assert kept_after_layers(batched_trace, N, sample=b, offset=pad) == \
            kept_after_layers(model.fitprune_trace, alone["input_ids"].shape[1])
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)
    if name != "llava":  # anyres / dynamic resolution: the two samples have different counts and drops
        counts = (batch["input_ids"] == model.fitprune_visual_token_ids[0]).sum(-1).tolist()
        assert counts[0] != counts[1]


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_recompute(tiny_paths, name):
    """Greedy decoding with the per-layer cache equals recomputing the whole sequence without a cache,
    the prefill's token choices replayed (dropped tokens stay in the cache of the layer that dropped them)."""
    model, processor = load_ours(tiny_paths[name], recipe=RECIPE)
    inputs = make_inputs(processor, [1])
    tokens, logits = generate(model, inputs, NEW)
    model.set_pruning(None, selector=OracleSelector(model.fitprune_trace.dropped_positions))
    full = dict(inputs)
    extra = tokens[:, :-1]
    full["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    recomputed = model(**full, use_cache=False).logits[:, -NEW:]
    assert recomputed.argmax(-1).tolist() == tokens.tolist()
    torch.testing.assert_close(recomputed, logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_sdpa_equals_eager(tiny_paths, name):
    results = {}
    for attn in ("eager", "sdpa"):
        model, processor = load_ours(tiny_paths[name], attn, recipe=RECIPE)
        inputs = make_inputs(processor, [0, 1])
        tokens, logits = generate(model, inputs, NEW)
        results[attn] = (tokens, logits, kept_after_layers(model.fitprune_trace, inputs["input_ids"].shape[1], 1))
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    assert results["eager"][2] == results["sdpa"][2]
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_beam_search_batched_equals_one_by_one(tiny_paths):
    """Beam search over a padded batch of two visual counts gives each sample's beams alone. (Beams of one
    sample share their prefill's key masks, so `PrunedCache.reorder_cache` moving them is not what this checks.)"""
    model, processor = load_ours(tiny_paths["qwen"], recipe=RECIPE)
    batch = make_inputs(processor, [0, 1])
    out = model.generate(**batch, max_new_tokens=NEW, num_beams=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for b in (0, 1):
        alone = make_inputs(processor, [b])
        ref = model.generate(**alone, max_new_tokens=NEW, num_beams=3, do_sample=False)[:, alone["input_ids"].shape[1]:]
        assert out[b].tolist() == ref[0].tolist()
