"""`fit` (core/fit.py) through the transformers-native backend: statistics equal the stock model's
eager attention maps (M-RoPE included), and the fitted recipe meets its budget and runs."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZES, QUESTIONS, generate, image, load_ours, load_stock, make_inputs
from llava_fitprune.core.fit import fit
from llava_fitprune.core.fit_runner import collect_statistics

ITEMS = [(image(s, IMAGE_SIZES[s % 2]), QUESTIONS[s % 2]) for s in range(3)]


@torch.no_grad()
@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_statistics_equal_stock_attention(tiny_paths, name):
    from llava_fitprune.adapters.hf.calibration import calibration_samples

    model, processor = load_ours(tiny_paths[name])
    stock = load_stock(tiny_paths[name], "eager")
    samples = calibration_samples(model, processor, ITEMS)
    stats = collect_statistics(model, samples, batch_size=2)
    for s, (img, question) in enumerate(ITEMS):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = dict(processor(images=[img], text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
                                return_tensors="pt"))
        attentions = stock(**inputs, output_attentions=True).attentions
        visual, text = samples[s].visual_mask[0], samples[s].text_mask[0]
        for l, probs in enumerate(attentions):
            M = probs[0].max(0).values.double()  # [N, N] head-max
            w_cross = M[text][:, visual].sum() / text.sum()
            w_self = M[visual][:, visual].sum() / visual.sum()
            torch.testing.assert_close(stats.w_cross[s, l], w_cross, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stats.w_self[s, l], w_self, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fit_meets_budget_and_runs(tiny_paths):
    from llava_fitprune.adapters.hf.calibration import calibration_samples

    model, processor = load_ours(tiny_paths["qwen"])
    samples = calibration_samples(model, processor, ITEMS)
    assert len({s.num_visual for s in samples}) > 1  # dynamic resolution: counts differ
    recipe = fit(model, samples, 0.3, progress=False, batch_size=2)
    assert recipe.num_layers == 4 and recipe.achieved_reduction >= 0.3
    assert recipe.num_visual_tokens == max(s.num_visual for s in samples)
    assert recipe.model["num_kv_heads"] == model.config.text_config.num_key_value_heads
    model.set_pruning(recipe)
    generate(model, make_inputs(processor, [0, 1]), 2)
    assert model.fitprune_last.recipe_fingerprint == recipe.fingerprint()
    assert all(k < n for k, n in zip(model.fitprune_last.visual_tokens_kept, model.fitprune_last.visual_tokens))
