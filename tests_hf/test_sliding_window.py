"""Sliding-window text models under pruning (issue #24 item 1): LLaVA-NeXT with a Mistral text model
(every layer slides) and Qwen2.5-VL with sliding layers past max_window_layers, window 16, prompts
of about 200 tokens. The window applies to original positions: a zero recipe equals stock; pruned
runs equal the plain reference, batched equals one by one, cached decoding equals recomputation."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import WINDOW, generate, kept_after_layers, load_ours, load_stock, make_inputs
from llava_fitprune.core.recipe import Recipe, zero_recipe
from llava_fitprune.core.selectors import OracleSelector
from reference_hf import reference_fitprune

RECIPE = Recipe([10, 20, 5, 0], num_visual_tokens=64)  # drops at a full and at a sliding layer of Qwen's
# Where every layer slides, FitPrune first drops the visual tokens outside the text's window (no cross
# attention): the kept ones stay a run ending at the text, where a window over rows would coincide with
# one over positions. 60 of 64 reach into the window, so that the kept tokens there have gaps.
RECIPES = {"next_mistral": Recipe([24, 24, 12, 0], num_visual_tokens=64), "qwen_window": RECIPE}
NEW = 4
WINDOWED = ("next_mistral", "qwen_window")


@torch.no_grad()
@pytest.mark.parametrize("name,attn", [("next_mistral", "sdpa"), ("qwen_window", "eager")])
def test_zero_recipe_equals_stock_with_window(window_paths, name, attn):
    stock = load_stock(window_paths[name], attn)
    model, processor = load_ours(window_paths[name], attn, recipe=zero_recipe(4, 64))
    inputs = make_inputs(processor, [0, 1])
    assert inputs["input_ids"].shape[1] > 2 * WINDOW and bool((inputs["attention_mask"] == 0).any())
    assert model.fitprune_text_model.fitprune.windows == {"next_mistral": [WINDOW] * 4,
                                                          "qwen_window": [None, None, WINDOW, WINDOW]}[name]
    assert torch.equal(model(**inputs).logits, stock(**inputs).logits)
    ours, theirs = generate(model, inputs, NEW), generate(stock, inputs, NEW)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@torch.no_grad()
@pytest.mark.parametrize("name", WINDOWED)
def test_pruned_window_equals_reference(window_paths, name):
    """Kept tokens at every layer, greedy tokens and logits equal the reference, whose window is over
    original positions and whose cache keeps every key."""
    stock = load_stock(window_paths[name], "eager")
    model, processor = load_ours(window_paths[name], recipe=RECIPES[name])
    for sample in (0, 1):
        inputs = make_inputs(processor, [sample])
        n_visual = int((inputs["input_ids"] == model.fitprune_visual_token_ids[0]).sum())
        kept, _, tokens, logits = reference_fitprune(stock, inputs, model.fitprune_visual_token_ids[0],
                                                     RECIPES[name].drops_for(n_visual), NEW)
        ours, our_logits = generate(model, inputs, NEW)
        assert kept_after_layers(model.fitprune_trace, inputs["input_ids"].shape[1]) == kept
        assert ours[0].tolist() == tokens
        torch.testing.assert_close(our_logits[0], logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", WINDOWED)
def test_pruned_window_batched_equals_one_by_one(window_paths, name):
    model, processor = load_ours(window_paths[name], recipe=RECIPES[name])
    batch = make_inputs(processor, [0, 1])
    tokens, logits = generate(model, batch, NEW)
    N = batch["input_ids"].shape[1]
    trace = model.fitprune_trace
    for b in (0, 1):
        alone = make_inputs(processor, [b])
        alone_tokens, alone_logits = generate(model, alone, NEW)
        assert kept_after_layers(trace, N, sample=b, offset=N - alone["input_ids"].shape[1]) == \
            kept_after_layers(model.fitprune_trace, alone["input_ids"].shape[1])
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", WINDOWED)
def test_pruned_window_cached_equals_recomputed(window_paths, name):
    """Decoding from the window-trimmed per-layer cache equals recomputing the whole sequence."""
    model, processor = load_ours(window_paths[name], recipe=RECIPES[name])
    inputs = make_inputs(processor, [1])
    tokens, logits = generate(model, inputs, NEW)
    model.set_pruning(None, selector=OracleSelector(model.fitprune_trace.dropped_positions))
    full, extra = dict(inputs), tokens[:, :-1]
    full["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    recomputed = model(**full, use_cache=False).logits[:, -NEW:]
    assert recomputed.argmax(-1).tolist() == tokens.tolist()
    torch.testing.assert_close(recomputed, logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_continues_a_stock_sliding_cache(window_paths):
    """A stock forward's cache (transformers' trimmed sliding layers) continued by the pruning loop
    gives the stock model's next logits."""
    stock = load_stock(window_paths["next_mistral"])
    model, processor = load_ours(window_paths["next_mistral"], recipe=zero_recipe(4, 64))
    inputs = make_inputs(processor, [1])
    first = stock(**inputs, use_cache=True)
    step = {"input_ids": first.logits[:, -1:].argmax(-1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)}
    ours = model(**step, cache=copy.deepcopy(first.cache)).logits
    assert torch.equal(ours, stock(**step, cache=first.cache).logits)


def test_window_settings(window_paths):
    """set_pruning(None) stays allowed on a sliding-window model; other layer types and attention
    implementations that cannot take the position window are refused with one line."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from llava_fitprune.adapters.hf import enable_pruning

    config = Qwen2_5_VLConfig(text_config=dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                               use_sliding_window=True, sliding_window=16, max_window_layers=2),
                              vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, num_heads=2))
    with torch.device("meta"):
        model = enable_pruning(Qwen2_5_VLForConditionalGeneration(config))
    assert model.set_pruning(None) is None
    assert model.set_pruning(RECIPE) is not None and model.fitprune_text_model.fitprune.windows == [None, None, 16, 16]
    text = model.fitprune_text_model.config
    text._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="needs attn_implementation 'sdpa' or 'eager'"):
        model.set_pruning(RECIPE)
    text._attn_implementation = "sdpa"
    text.layer_types, text.attention_chunk_size = ["full_attention", "chunked_attention"] * 2, 8
    with pytest.raises(NotImplementedError, match=r"also has \['chunked_attention'\]"):
        model.set_pruning(RECIPE)
    assert model.fitprune_recipe == RECIPE  # the refused calls changed nothing
    assert model.set_pruning(None) is None and model.fitprune_recipe is None


def test_fit_refuses_sliding_window_models(window_paths):
    """The fit runner's attention has no window: calibrating such a model is refused, not run wrong."""
    from llava_fitprune.adapters.hf.calibration import CalibrationError, calibration_samples

    model, processor = load_ours(window_paths["qwen_window"])
    with pytest.raises(CalibrationError, match="sliding-window layers"):
        calibration_samples(model, processor, [(None, "what is it?")])
