"""Processors (issue #23 item 4, #24): convert.py writes one, so its output loads with load_pretrained;
a LLaVA processor saved by transformers 4.37 (no patch_size) is completed from the model config;
QwenImageTextProcessor (no torchvision) saves and reloads."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import image, make_inputs
from llava_fitprune.adapters.hf import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "eval_data", "synth_llava", "checkpoint")
QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The shipped synthetic LLaVA-1.5 checkpoint converted to llava-hf."""
    from llava_fitprune.adapters.hf.convert import convert_llava_to_hf

    return convert_llava_to_hf(SYNTH, os.path.join(SYNTH, "vision_tower"), str(tmp_path_factory.mktemp("conv") / "hf"))


def _inputs(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return text, dict(processor(images=[image(0, (300, 200))], text=[text], return_tensors="pt"))


@torch.no_grad()
def test_converted_checkpoint_loads_with_its_processor(converted):
    model, processor = load_pretrained(converted)
    text, inputs = _inputs(processor)
    assert text.endswith(f" USER: <image>\n{QUESTION} ASSISTANT:")  # LLaVA's vicuna_v1 layout
    vision = model.config.vision_config
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == (vision.image_size // vision.patch_size) ** 2  # one placeholder per visual token
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def _as_saved_by_4_37(converted: str, out: str) -> str:
    """The converted model with the processor files transformers 4.37.2's LlavaProcessor.save_pretrained
    writes (checked against it once): preprocessor_config.json and the slow tokenizer's files, each
    naming processor_class, <image> an added token; no processor_config.json, so no patch_size."""
    os.makedirs(out)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(converted, name), out)
    for name in ("tokenizer.model", "special_tokens_map.json"):
        shutil.copy(os.path.join(SYNTH, name), out)
    with open(os.path.join(SYNTH, "vision_tower", "preprocessor_config.json")) as f:
        pre = json.load(f)
    with open(os.path.join(SYNTH, "tokenizer_config.json")) as f:
        tok = json.load(f)
    image_id = json.load(open(os.path.join(converted, "config.json")))["image_token_index"]
    tok["added_tokens_decoder"][str(image_id)] = {"content": "<image>", "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}
    tok["additional_special_tokens"] = ["<image>"]
    for name, data in (("preprocessor_config.json", {**pre, "processor_class": "LlavaProcessor"}),
                       ("tokenizer_config.json", {**tok, "processor_class": "LlavaProcessor"}),
                       ("added_tokens.json", {"<image>": image_id})):
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=2)
    return out


@torch.no_grad()
def test_processor_saved_by_4_37_is_completed(converted, tmp_path):
    """patch_size, the feature strategy and CLIP's extra token come from the model config: as many image
    placeholders (24 x 24 patches) and the same pixels as the processor convert.py writes."""
    old = _as_saved_by_4_37(converted, str(tmp_path / "v437"))
    model, processor = load_pretrained(old)
    assert (processor.patch_size, processor.vision_feature_select_strategy, processor.num_additional_image_tokens) \
        == (model.config.vision_config.patch_size, "default", 1)
    _, new_processor = load_pretrained(converted)
    text = f"USER: <image>\n{QUESTION} ASSISTANT:"
    ours = processor(images=[image(0, (300, 200))], text=[text], return_tensors="pt")
    ref = new_processor(images=[image(0, (300, 200))], text=[text], return_tensors="pt")
    image_id = model.config.image_token_id  # (the text around <image> may tokenize differently: the slow files)
    assert (ours["input_ids"] == image_id).sum(-1).tolist() == (ref["input_ids"] == image_id).sum(-1).tolist() == \
        [(model.config.vision_config.image_size // processor.patch_size) ** 2]
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    model.generate(**ours, max_new_tokens=1, do_sample=False)


def test_legacy_processor_of_an_unknown_tower_is_one_line():
    from llava_fitprune.adapters.hf.loading import fill_legacy_llava_processor

    config = SimpleNamespace(vision_config=SimpleNamespace(model_type="pixtral", patch_size=16),
                             vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="'pixtral' vision tower's cannot be inferred: add patch_size") as err:
        fill_legacy_llava_processor(SimpleNamespace(patch_size=None), config, "ckpt")
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_qwen_image_text_processor_saves_and_reloads(tiny_paths, tmp_path):
    from llava_fitprune.adapters.hf import QwenImageTextProcessor

    model, processor = load_pretrained(tiny_paths["qwen"])
    assert isinstance(processor, QwenImageTextProcessor)  # .venv-hf has no torchvision
    model.save_pretrained(tmp_path / "q")
    processor.save_pretrained(tmp_path / "q")
    _, again = load_pretrained(str(tmp_path / "q"))
    assert isinstance(again, QwenImageTextProcessor)
    a, b = make_inputs(processor, [0, 1]), make_inputs(again, [0, 1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
