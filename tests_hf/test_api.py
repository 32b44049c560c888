"""The backend's public verbs, per-instance pruning, clear errors, and item 4: the authors' LLaVA-1.5-7B
recipes apply to llava-hf LLaVA-1.5-7B unchanged (a model of the real shape on the meta device)."""
from __future__ import annotations

import pytest
import torch

from conftest import generate, load_ours, load_stock, make_inputs
from llava_fitprune.core.flops import NAMED_SHAPES, LMShape
from llava_fitprune.core.recipe import Recipe, RecipeError, builtin_recipes

RECIPE = Recipe([10, 20, 5, 0], num_visual_tokens=64)


def llava_hf_7b_config():
    """llava-hf/llava-1.5-7b-hf's config.json (the values that shape the model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def test_authors_recipes_apply_to_llava_hf_7b_unchanged():
    from transformers import LlavaForConditionalGeneration

    from llava_fitprune.adapters.hf import enable_pruning

    config = llava_hf_7b_config()
    with torch.device("meta"):
        model = enable_pruning(LlavaForConditionalGeneration(config))
    shape = model.fitprune_shape
    # the same language model as haotian-liu's LLaVA-1.5-7B (llava-hf only adds <image> and padding rows)
    assert {**shape.to_dict(), "vocab_size": 0} == {**NAMED_SHAPES["llava-v1.5-7b"].to_dict(), "vocab_size": 0}
    vision = config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2
    assert n_visual == config.image_seq_length
    recipes = builtin_recipes()
    assert len(recipes) >= 10
    for recipe in recipes:
        used = model.set_pruning(reduction_ratio=recipe.reduction_ratio)
        assert used.drop_per_layer == recipe.drop_per_layer and used.num_visual_tokens == n_visual
        assert used.drops_for(n_visual) == list(recipe.drop_per_layer)  # applied as published, no scaling
        assert model.fitprune_recipe is used


def test_recipe_of_another_depth_is_refused():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from llava_fitprune.adapters.hf import enable_pruning

    config = Qwen2_5_VLConfig(text_config=dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
                              vision_config=dict(depth=1, hidden_size=64, out_hidden_size=3584, num_heads=2))
    with torch.device("meta"):
        model = enable_pruning(Qwen2_5_VLForConditionalGeneration(config))
    assert model.fitprune_shape == LMShape(28, 3584, 18944, 28, 4, 152064)
    with pytest.raises(RecipeError, match="32 layers but the model has 28.*fit"):
        model.set_pruning(reduction_ratio=0.6)


@torch.no_grad()
def test_pruning_is_per_instance(tiny_paths):
    from transformers import LlavaForConditionalGeneration

    model, processor = load_ours(tiny_paths["llava"], recipe=RECIPE)
    other = load_stock(tiny_paths["llava"])
    assert type(other) is LlavaForConditionalGeneration and not hasattr(other, "set_pruning")
    assert isinstance(model, LlavaForConditionalGeneration) and type(model) is not LlavaForConditionalGeneration
    inputs = make_inputs(processor, [0])
    assert not torch.equal(model(**inputs).logits[:, -1], other(**inputs).logits[:, -1])
    model.set_pruning(None)  # back to the stock forward
    assert torch.equal(model(**inputs).logits, other(**inputs).logits)
    assert model.fitprune_last is None


@torch.no_grad()
def test_prompt_without_image_runs_unpruned(tiny_paths):
    model, processor = load_ours(tiny_paths["llava"], recipe=RECIPE)
    stock = load_stock(tiny_paths["llava"])
    inputs = dict(processor.tokenizer(["what is the colour of the shape?"], return_tensors="pt"))
    assert torch.equal(generate(model, inputs, 3)[0], generate(stock, inputs, 3)[0])
    assert model.fitprune_last.visual_tokens == [0] and model.fitprune_trace.dropped_positions == [None] * 4


@torch.no_grad()
def test_fitprune_last_records_the_prefill(tiny_paths):
    model, processor = load_ours(tiny_paths["next"], recipe=RECIPE, dtype="float32")
    inputs = make_inputs(processor, [0, 1])
    generate(model, inputs, 2)
    last = model.fitprune_last
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert last.method == "fitprune" and last.recipe_fingerprint == RECIPE.fingerprint()
    assert last.visual_tokens == counts
    assert last.visual_tokens_kept == [n - sum(RECIPE.drops_for(n)) for n in counts]
    assert all(p < d for p, d in zip(last.prefill_tflops, last.dense_prefill_tflops))
    assert last.tokens_entering[0][0] == int(inputs["attention_mask"][0].sum())
    assert set(last.to_dict()) >= {"method", "recipe_fingerprint", "visual_tokens", "prefill_tflops"}


def test_other_methods_and_errors(tiny_paths, tmp_path):
    from transformers import LlamaConfig

    model, processor = load_ours(tiny_paths["qwen"], method="random", reduction_ratio=None, recipe=RECIPE, seed=3)
    inputs = make_inputs(processor, [1])
    with torch.no_grad():
        generate(model, inputs, 2)
    assert model.fitprune_last.method == "random"
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="not supported by the transformers backend"):
        LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path)
        load_ours(str(tmp_path))


@torch.no_grad()
def test_fastv_drops_what_the_stock_attention_ranks_lowest(tiny_paths):
    """FastV (K=2, R=50%): after layer 1's attention, the visual tokens the last prompt token attends to
    least (head mean) in the stock model's own eager attention map."""
    model, processor = load_ours(tiny_paths["qwen"], method="fastv", num_visual_tokens=64)
    stock = load_stock(tiny_paths["qwen"], "eager")
    inputs = make_inputs(processor, [1])
    generate(model, inputs, 1)
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    n_drop = model.fitprune_recipe.drops_for(len(visual))[1]
    from_last = stock(**inputs, output_attentions=True).attentions[1][0].mean(0)[-1]  # [N]
    expected = visual[torch.argsort(from_last[visual], stable=True)[:n_drop]]
    dropped = model.fitprune_trace.dropped_positions
    assert [p is None for p in dropped] == [True, False, True, True]
    assert sorted(int(p) for p in dropped[1][0] if p >= 0) == sorted(expected.tolist())


@torch.no_grad()
def test_save_pretrained_records_the_pruning_and_load_restores_it(tiny_paths, tmp_path):
    """A saved pruning model reloads with its schedule, method and options (random's seed: the same
    tokens drop); a model set back to dense saves as dense; an oracle cannot be saved; the checkpoint
    still loads with the stock class."""
    from llava_fitprune.core.selectors import OracleSelector, RandomSelector
    from transformers import LlavaForConditionalGeneration

    model, processor = load_ours(tiny_paths["llava"], method="random", recipe=RECIPE, seed=7)
    inputs = make_inputs(processor, [0])
    tokens = generate(model, inputs, 3)[0]
    dropped = model.fitprune_trace.dropped_positions
    model.save_pretrained(tmp_path / "pruned")
    processor.save_pretrained(tmp_path / "pruned")
    again, _ = load_ours(str(tmp_path / "pruned"))
    state = again.fitprune_text_model.fitprune
    assert again.fitprune_recipe == model.fitprune_recipe and again.fitprune_recipe.drop_per_layer == \
        RECIPE.drop_per_layer and isinstance(state.selector, RandomSelector) and state.selector.seed == 7
    assert torch.equal(generate(again, inputs, 3)[0], tokens)
    assert [None if d is None else d.tolist() for d in again.fitprune_trace.dropped_positions] == \
        [None if d is None else d.tolist() for d in dropped]
    assert type(load_stock(str(tmp_path / "pruned"))) is LlavaForConditionalGeneration

    again.set_pruning(None)
    again.save_pretrained(tmp_path / "dense")
    processor.save_pretrained(tmp_path / "dense")
    assert load_ours(str(tmp_path / "dense"))[0].fitprune_recipe is None

    model.set_pruning(RECIPE, selector=OracleSelector(list(dropped)))
    with pytest.raises(ValueError, match="cannot save a model pruning with the 'oracle' selector"):
        model.save_pretrained(tmp_path / "oracle")


@pytest.mark.parametrize("name", ["onevision", "qwen2vl"])
def test_processor_fallbacks_take_a_saved_chat_template(tiny_paths, tmp_path, name):
    """The images-and-text processors made where AutoProcessor cannot (no torchvision) take the chat
    template a hub checkpoint's processor saved in chat_template.json (the tokenizer reads only its own
    chat_template.jinja, removed here)."""
    import json
    import shutil

    from transformers import AutoConfig

    from llava_fitprune.adapters.hf.loading import load_processor

    path = shutil.copytree(tiny_paths[name], tmp_path / name)
    (path / "chat_template.jinja").unlink()
    with open(path / "chat_template.json", "w") as f:
        json.dump({"chat_template": "saved: {{ messages[0]['content'][0]['text'] }}"}, f)
    processor = load_processor(str(path), AutoConfig.from_pretrained(path))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is red"}]}]
    assert processor.apply_chat_template(msgs, tokenize=False) == "saved: what is red"
