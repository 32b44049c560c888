"""The FLOPs model against torch's FlopCounterMode on tiny random language models of the transformers-native
families (llava-hf LLaVA-1.5 / NeXT-Vicuna: Llama; NeXT-Mistral: Mistral with GQA; LLaVA-OneVision: Qwen2 with
GQA and q/k/v biases; Qwen2-VL / Qwen2.5-VL: GQA, q/k/v biases, M-RoPE with 3-D position ids; Qwen3-VL: a
head_dim other than hidden / heads, q/k norms, interleaved M-RoPE; InternVL: Qwen2 or Llama), and the named
7B shapes."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (InternVLConfig, InternVLForConditionalGeneration, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, MistralConfig,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

from llava_fitprune.core.flops import (NAMED_SHAPES, LMShape, dense_prefill_flops, llava_hf_shape, prefill_report,
                                       resolve_shape)
from llava_fitprune.core.recipe import builtin_recipe

TINY_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=200)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                 patch_size=14, projection_dim=32)


def _counted(model, **inputs) -> int:
    # eager attention: its matmuls are what FlopCounterMode counts (it has no formula for CPU SDPA)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["llava", "llava_next_vicuna", "llava_next_mistral", "llava_onevision"])
def test_llava_family_flops_match_flop_counter(family):
    text_class, config_class, model_class = {
        "llava": (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration),
        "llava_next_vicuna": (LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration),
        "llava_next_mistral": (MistralConfig, LlavaNextConfig, LlavaNextForConditionalGeneration),
        "llava_onevision": (Qwen2Config, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration)}[family]
    kv_heads = TINY_TEXT["num_attention_heads"] if text_class is LlamaConfig else 2
    text = text_class(**TINY_TEXT, num_key_value_heads=kv_heads)
    vision = ({"model_type": "siglip_vision_model", **{k: v for k, v in TINY_CLIP.items() if k != "projection_dim"}}
              if family == "llava_onevision" else {"model_type": "clip_vision_model", **TINY_CLIP})
    config = config_class(text_config=text, vision_config=vision, image_token_id=TINY_TEXT["vocab_size"] - 1)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    n = 23
    ids = torch.randint(0, TINY_TEXT["vocab_size"] - 1, (1, n))  # the language model alone: no image token
    shape = LMShape.from_config(config)
    assert shape.num_kv_heads == text.num_key_value_heads
    counted = _counted(model, input_ids=ids)
    predicted = dense_prefill_flops(shape, n)
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


QWEN_VISION = {  # the vision tower projects to the LM width (64): Qwen2.5-VL's out_hidden_size, Qwen2-VL's hidden_size
    "qwen2_5_vl": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                       spatial_merge_size=2, window_size=56, fullatt_block_indexes=[0]),
    "qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                     spatial_merge_size=2)}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_flops_match_flop_counter_with_mrope_positions(family):
    config_class, model_class = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                                 "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[family]
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    config = config_class(
        text_config=dict(**TINY_TEXT, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=QWEN_VISION[family],
        image_token_id=195, video_token_id=196, vision_start_token_id=197, vision_end_token_id=198)
    assert sum(config.get_text_config().rope_parameters["mrope_section"]) * 2 == head_dim
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    grid = torch.tensor([[1, 4, 6]])  # t, h, w patches: 4 * 6 / merge 2x2 = 6 image tokens
    n_image = int(grid.prod()) // config.vision_config.spatial_merge_size ** 2
    ids = torch.cat([torch.randint(0, 190, (1, 5)), torch.tensor([[197] + [195] * n_image + [198]]),
                     torch.randint(0, 190, (1, 9))], dim=1)
    mm_types = (ids == 195).int()
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
    assert positions.shape[0] == 3 and not torch.equal(positions[1], positions[2])  # 3-D: the image's h and w differ
    embeds = model.get_input_embeddings()(ids)
    counted = _counted(model, inputs_embeds=embeds, position_ids=positions)
    shape = LMShape.from_config(config)
    assert (shape.num_heads, shape.num_kv_heads, shape.num_layers) == (4, 2, 3)
    predicted = dense_prefill_flops(shape, ids.shape[1])
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


def test_qwen3_vl_flops_match_flop_counter_with_its_own_head_dim():
    config = Qwen3VLConfig(
        text_config=dict(**TINY_TEXT, num_key_value_heads=2, head_dim=24,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=195, video_token_id=196, vision_start_token_id=197, vision_end_token_id=198)
    config._attn_implementation = "eager"
    model = Qwen3VLForConditionalGeneration(config).eval()
    grid = torch.tensor([[1, 4, 6]])
    n_image = int(grid.prod()) // config.vision_config.spatial_merge_size ** 2
    ids = torch.cat([torch.randint(0, 190, (1, 5)), torch.tensor([[197] + [195] * n_image + [198]]),
                     torch.randint(0, 190, (1, 9))], dim=1)
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == 195).int(), image_grid_thw=grid)
    assert not torch.equal(positions[1], positions[2])  # 3-D: the image's h and w differ
    counted = _counted(model, inputs_embeds=model.get_input_embeddings()(ids), position_ids=positions)
    shape = LMShape.from_config(config)
    assert shape.head_dim == 24 != shape.hidden_size // shape.num_heads and "explicit_head_dim" in shape.to_dict()
    predicted = dense_prefill_flops(shape, ids.shape[1])
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


@pytest.mark.parametrize("text_class", [Qwen2Config, LlamaConfig])
def test_internvl_flops_match_flop_counter(text_class):
    config = InternVLConfig(text_config=text_class(**TINY_TEXT, num_key_value_heads=2),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=56, patch_size=14),
                            image_token_id=199, image_seq_length=4)
    config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config).eval()
    ids = torch.randint(0, 190, (1, 21))  # the language model alone
    shape = LMShape.from_config(config)
    assert (shape.num_kv_heads, shape.num_layers) == (2, 3) and "explicit_head_dim" not in shape.to_dict()
    counted = _counted(model, input_ids=ids)
    predicted = dense_prefill_flops(shape, ids.shape[1])
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


def test_named_shapes_against_transformers_config_classes():
    # llava-hf's config.json names only the text config's differences from LlamaConfig's defaults (its
    # vocab_size among them): those defaults are LLaVA-1.5-7B's language model.
    llava_hf = LMShape.from_config(LlavaConfig(text_config=LlamaConfig(vocab_size=32064)))
    assert NAMED_SHAPES["llava-hf/llava-1.5-7b-hf"] == llava_hf
    assert NAMED_SHAPES["llava-hf/llava-v1.6-vicuna-7b-hf"] == llava_hf
    assert NAMED_SHAPES["llava-hf/llava-v1.6-mistral-7b-hf"].num_kv_heads == 8
    qwen = NAMED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert Qwen2_5_VLConfig().vision_config.out_hidden_size == qwen.hidden_size
    assert qwen.head_dim * qwen.num_heads == qwen.hidden_size and qwen.num_heads % qwen.num_kv_heads == 0
    qwen3 = NAMED_SHAPES["Qwen/Qwen3-VL-8B-Instruct"]
    assert Qwen3VLConfig().text_config.head_dim == qwen3.head_dim and qwen3.explicit_head_dim is None
    assert qwen3.num_heads % qwen3.num_kv_heads == 0
    assert NAMED_SHAPES["Qwen/Qwen2-VL-7B-Instruct"] == qwen  # both: Qwen2-7B's language model
    assert Qwen2VLConfig().vision_config.hidden_size == qwen.hidden_size
    # transformers' OneVision conversion: Qwen2-7B-Instruct plus <image> and <video>, padded to 64 rows
    onevision = NAMED_SHAPES["llava-hf/llava-onevision-qwen2-7b-ov-hf"]
    assert onevision == llava_hf_shape(qwen) and onevision.vocab_size == 152128


def test_resolve_shape_completes_a_saved_llava_hf_config(tmp_path):
    config = LlavaConfig(text_config=LlamaConfig(vocab_size=32064))
    config.save_pretrained(tmp_path)
    assert resolve_shape(str(tmp_path)) == NAMED_SHAPES["llava-hf/llava-1.5-7b-hf"]


def test_authors_recipes_apply_to_llava_hf_unchanged(capsys):
    """Same language model: the same drops; only the LM head's 64 extra rows cost more."""
    from llava_fitprune.cli.flops import main

    fork, hf = NAMED_SHAPES["llava-v1.5-7b"], NAMED_SHAPES["llava-hf/llava-1.5-7b-hf"]
    drops = builtin_recipe(0.6).drop_per_layer
    a, b = prefill_report(fork, 65, 576, drops), prefill_report(hf, 65, 576, drops)
    assert b.pruned_flops - a.pruned_flops == 2 * b.schedule[-1] * hf.hidden_size * (hf.vocab_size - fork.vocab_size)
    assert main(["--config", "llava-hf/llava-1.5-7b-hf", "--reduction-ratio", "0.6"]) == 0
    assert "| 0.6 | 449 |" in capsys.readouterr().out


def test_flops_cli_on_qwen2_5_vl_prints_dense_and_ships_no_recipe(capsys):
    from llava_fitprune.cli.flops import main

    assert main(["--config", "Qwen/Qwen2.5-VL-7B-Instruct"]) == 0
    out = capsys.readouterr().out
    dense = dense_prefill_flops(NAMED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"], 35 + 576 + 30)
    assert f"{dense / 1e12:.3f} TFLOPs" in out and "heads 28/4" in out and "no built-in recipe has 28 layers" in out
    with pytest.raises(SystemExit):  # the authors' recipes are LLaVA-1.5-7B's (32 layers)
        main(["--config", "Qwen/Qwen2.5-VL-7B-Instruct", "--reduction-ratio", "0.6"])
