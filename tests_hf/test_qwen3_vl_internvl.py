"""What is particular to Qwen3-VL (DeepStack after a drop) and InternVL (its language models); the
exactness tests every family shares are in test_exactness.py."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZES, QUESTIONS, generate, image, kept_after_layers, load_ours, load_stock, make_inputs
from llava_fitprune.core.recipe import Recipe
from reference_hf import reference_fitprune

NEW = 3


@torch.no_grad()
def test_qwen3_vl_deepstack_follows_the_kept_rows(tiny_paths):
    """A drop at layer 0 only, while DeepStack still adds in layers 0..2 (the tiny model's three): each kept
    visual token gets the DeepStack row of its original position. The independent reference that gathers
    the rows by kept original positions agrees; one that adds them in order (the first k rows to the k kept
    visual tokens) does not, so this tells the two apart."""
    model, processor = load_ours(tiny_paths["qwen3"], recipe=Recipe([40, 0, 0, 0], num_visual_tokens=64))
    stock = load_stock(tiny_paths["qwen3"], "eager")
    assert len(stock.config.vision_config.deepstack_visual_indexes) == 3
    inputs = make_inputs(processor, [0])
    visual_id = model.config.image_token_id
    drops = Recipe([40, 0, 0, 0], num_visual_tokens=64).drops_for(int((inputs["input_ids"] == visual_id).sum()))
    assert drops[0] > 0 and sum(drops[1:]) == 0
    tokens, logits = generate(model, inputs, NEW)
    kept, _, ref_tokens, ref_logits = reference_fitprune(stock, inputs, visual_id, drops, NEW)
    assert kept_after_layers(model.fitprune_trace, inputs["input_ids"].shape[1]) == kept
    assert tokens[0].tolist() == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=1e-4)
    _, _, _, in_order_logits = reference_fitprune(stock, inputs, visual_id, drops, NEW, deepstack_rows="in_order")
    assert (in_order_logits[0] - ref_logits[0]).abs().max() > 1e-2


def test_internvl_with_another_language_model_is_refused_before_the_weights(tmp_path):
    from transformers import InternVLConfig, Qwen3Config

    from llava_fitprune.adapters.hf import load_pretrained

    text = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2)
    InternVLConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"InternVL with a 'qwen3' language model is not supported .*qwen2, llama"):
        load_pretrained(str(tmp_path))  # the folder has no weights: the refusal comes first


@torch.no_grad()
def test_internvl_with_a_llama_language_model_prunes_as_the_reference(tmp_path):
    """InternVL's other language model (Llama, InternVL2.5's smaller sizes' layout): kept tokens and answers
    of the independent reference."""
    from llava_fitprune.adapters.hf.tiny_internvl import build_tiny_internvl

    path = build_tiny_internvl(str(tmp_path / "internvl-llama"), text_model="llama")
    recipe = Recipe([10, 20, 5, 0], num_visual_tokens=64)
    model, processor = load_ours(path, recipe=recipe)
    stock = load_stock(path, "eager")
    assert stock.config.text_config.model_type == "llama"
    inputs = make_inputs(processor, [1])
    visual_id = model.config.image_token_id
    drops = recipe.drops_for(int((inputs["input_ids"] == visual_id).sum()))
    tokens, logits = generate(model, inputs, NEW)
    kept, _, ref_tokens, ref_logits = reference_fitprune(stock, inputs, visual_id, drops, NEW)
    assert kept_after_layers(model.fitprune_trace, inputs["input_ids"].shape[1]) == kept
    assert tokens[0].tolist() == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=1e-4)


def test_fit_refuses_qwen3_vl_in_one_line(tiny_paths):
    from llava_fitprune.adapters.hf.calibration import calibration_samples

    model, processor = load_ours(tiny_paths["qwen3"])
    with pytest.raises(NotImplementedError, match="fit cannot calibrate Qwen3-VL yet"):
        calibration_samples(model, processor, [(image(0, IMAGE_SIZES[0]), QUESTIONS[0])])


@torch.no_grad()
@pytest.mark.parametrize("name,lmms_model", [("qwen3", "fitprune_qwen3_vl"), ("internvl", "fitprune_internvl")])
def test_lmms_eval_model_answers_as_the_direct_api(tiny_paths, tmp_path, name, lmms_model):
    """The family's lmms-eval model, pruned, batch 2 (two image sizes, left-padded): the answers of the
    direct API one by one, and each sample's record of its own drops."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    recipe = Recipe([10, 20, 5, 0], num_visual_tokens=64)
    recipe.save(tmp_path / "recipe.json")
    lm = get_model(lmms_model)(pretrained=tiny_paths[name], recipe=str(tmp_path / "recipe.json"), device="cpu",
                               batch_size=2)
    lm.task_dict = {"t": {"test": [{"q": q, "size": s} for q, s in zip(QUESTIONS, IMAGE_SIZES)]}}
    requests = [Instance("generate_until", (QUESTIONS[i], {"max_new_tokens": NEW, "until": []},
                                            lambda d: [image(QUESTIONS.index(d["q"]), d["size"])], i, "t", "test"),
                         idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in (0, 1)]
    answers = lm.generate_until(requests)
    model, processor = load_ours(tiny_paths[name], recipe=recipe)
    for i, answer in enumerate(answers):
        inputs = make_inputs(processor, [i])
        tokens, _ = generate(model, inputs, NEW)
        assert (answer.text if hasattr(answer, "text") else answer) == processor.decode(tokens[0], skip_special_tokens=True)
        record = answer.token_counts.fitprune
        n_visual = int((inputs["input_ids"] == model.fitprune_visual_token_ids[0]).sum())
        assert (record["visual_tokens"], record["visual_tokens_kept"]) == (n_visual, n_visual - sum(recipe.drops_for(n_visual)))
