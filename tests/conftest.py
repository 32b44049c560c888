"""Shared fixtures: tiny random LLaVA checkpoints built offline, stock and pruning-aware loaders."""
from __future__ import annotations

import json
import os

import pytest
import torch

from llava_fitprune.synth.scenes import SceneConfig, write_split
from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

torch.set_num_threads(2)

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny"), TinyLlavaSpec(num_layers=4))


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory):
    spec = TinyLlavaSpec(num_layers=3, num_heads=4, num_kv_heads=2, image_size=112, seed=3)
    return build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny-gqa"), spec)


@pytest.fixture(scope="session")
def tiny32_dir(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-tiny32"), TinyLlavaSpec(num_layers=32))


def load_ours(path, attn="sdpa", device="cpu", **kw):
    from llava_fitprune import load_pretrained_model

    return load_pretrained_model(path, None, os.path.basename(path), device=device, attn_implementation=attn, **kw)


def load_stock(path, attn="sdpa", device="cpu", dtype=torch.float32):
    """LLaVA's own class, on CPU in fp32 by default (LLaVA's builder forces fp16 + CUDA). As LLaVA's
    builder (device_map "auto"), the CLIP tower stays float32 whatever `dtype` the language model gets."""
    from llava.model import LlavaLlamaForCausalLM

    cwd = os.getcwd()
    os.chdir(path)  # the tiny checkpoint names its vision tower relative to itself
    try:
        model = LlavaLlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation=attn)
        model.get_vision_tower().load_model()
    finally:
        os.chdir(cwd)
    model.to(device=device, dtype=dtype)
    model.get_vision_tower().to(dtype=torch.float32)
    return model.eval()


def prompt_ids(tokenizer, question, system=SYSTEM):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    text = f"{system} USER: <image>\n{question} ASSISTANT:" if "<image>" not in question else f"{system} USER: {question} ASSISTANT:"
    return tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def image_tensor(seed, size):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=g)


def batch_ids(tokenizer, questions):
    """Right-pad prompts as a batch; LLaVA re-pads after expanding the image."""
    ids = [prompt_ids(tokenizer, q) for q in questions]
    n = max(len(x) for x in ids)
    out = torch.full((len(ids), n), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.bool)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
        mask[i, : len(x)] = True
    return out, mask


@pytest.fixture(scope="module")
def one_thread():
    """Many small ops: on a loaded 2-core machine, 2 OpenMP threads wait on each other at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- synthetic task (module scope: training tests change the tiny2 model in place) -----------------

SYNTH_SEED = 7


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("synth")), "train", 6, SYNTH_SEED)


@pytest.fixture(scope="module")
def short_split(tmp_path_factory):
    """Two scenes with one question per type: short sequences for the training test."""
    return write_split(str(tmp_path_factory.mktemp("synth")), "train", 2, SYNTH_SEED, SceneConfig(train_per_type=1))


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """A 2-layer tiny LLaVA (336 px, 576 visual tokens) loaded with LLaVA's class."""
    from llava_fitprune.synth.model_io import load_llava
    from llava_fitprune.synth.questions import phrasebook
    from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec(num_layers=2, hidden_size=64, intermediate_size=128, vision_layers=1,
                         tokenizer_extra_text=phrasebook(), tokenizer_extra_repeat=20, init_std=None)
    path = build_tiny_llava(str(tmp_path_factory.mktemp("ckpt") / "llava-synth-2l"), spec)
    return path, load_llava(path)


@pytest.fixture(scope="module")
def grounded_batch(short_split, tiny2):
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.data import llava_collator, llava_dataset
    from llava_fitprune.synth.grounding import grounding_targets, word_token_ids

    _, (tok, model, proc) = tiny2
    ds = llava_dataset(short_split, tok, proc)
    with open(os.path.join(short_split, "scenes.jsonl")) as f:
        scenes = {row["image"]: row for row in map(json.loads, f)}
    batch = llava_collator(tok)([ds[0], ds[1]])
    rows = [scenes[ds.list_data_dict[i]["image"]] for i in (0, 1)]
    word_ids = word_token_ids(tok)
    targets = grounding_targets(batch["input_ids"], batch["labels"], rows, word_ids, IMAGE_TOKEN_INDEX, 24, 1)
    return ds, batch, rows, word_ids, targets


@pytest.fixture(scope="module")
def stock_eager(grounded_batch, tiny2):
    """(inputs_embeds [B, N, D], the stock decoder's eager output with every layer's attentions and inputs)."""
    _, batch, _, _, _ = grounded_batch
    _, (_, model, _) = tiny2
    config = model.get_model().config
    before = config._attn_implementation
    with torch.no_grad():
        _, _, attention_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
        config._attn_implementation = "eager"
        try:
            stock = model.get_model()(inputs_embeds=embeds, attention_mask=attention_mask, output_attentions=True,
                                      output_hidden_states=True)
        finally:
            config._attn_implementation = before
    return embeds, stock


@pytest.fixture
def fresh_training(short_split, tiny2):
    """(a fresh copy of tiny2's model, LLaVA's dataset of short_split, LLaVA's collator, scenes by image name)."""
    from llava_fitprune.synth.data import llava_collator, llava_dataset
    from llava_fitprune.synth.model_io import load_llava

    tok, model, proc = load_llava(tiny2[0])
    ds = llava_dataset(short_split, tok, proc)
    with open(os.path.join(short_split, "scenes.jsonl")) as f:
        scenes = {row["image"]: row for row in map(json.loads, f)}
    return model, ds, llava_collator(tok), scenes
