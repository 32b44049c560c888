"""Fixtures of the transformers-native backend's suite (run with .venv-hf: `.venv-hf/bin/python -m pytest -q tests_hf`):
tiny random llava-hf, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL checkpoints
built offline, and their inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

MODELS = ("llava", "next", "onevision", "qwen2vl", "qwen", "qwen3", "internvl")
QUESTIONS = ("what is the colour of the shape?", "how many red circle are there? answer with a single word")
IMAGE_SIZES = ((100, 150), (160, 90))  # (height, width): anyres and dynamic resolution give different counts


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from llava_fitprune.adapters.hf.tiny import (build_tiny_llava_hf, build_tiny_llava_onevision, build_tiny_qwen2_5_vl,
                                                 build_tiny_qwen2_vl)
    from llava_fitprune.adapters.hf.tiny_internvl import build_tiny_internvl
    from llava_fitprune.adapters.hf.tiny_qwen3_vl import build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("hf_ckpt")
    return {"llava": build_tiny_llava_hf(str(root / "llava-hf-tiny")),
            "next": build_tiny_llava_hf(str(root / "llava-next-tiny"), next_anyres=True),
            "onevision": build_tiny_llava_onevision(str(root / "llava-onevision-tiny")),
            "qwen2vl": build_tiny_qwen2_vl(str(root / "qwen2_vl-tiny")),
            "qwen": build_tiny_qwen2_5_vl(str(root / "qwen2_5_vl-tiny")),
            "qwen3": build_tiny_qwen3_vl(str(root / "qwen3_vl-tiny")),
            "internvl": build_tiny_internvl(str(root / "internvl-tiny"))}


WINDOW = 16  # sliding window of the windowed variants: below their prompts (NeXT: about 200 tokens, Qwen: about 40)


def _set_text_config(path: str, **changes) -> str:
    import json
    import os

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["text_config"].update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


@pytest.fixture(scope="session")
def window_paths(tmp_path_factory):
    """Sliding-window variants: LLaVA-NeXT whose text model is Mistral (every layer slides), and
    Qwen2.5-VL with use_sliding_window past max_window_layers=2 (layers 0-1 full, 2-3 sliding)."""
    from llava_fitprune.adapters.hf.tiny import build_tiny_llava_hf, build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("hf_window")
    next_mistral = build_tiny_llava_hf(str(root / "llava-next-mistral-tiny"), next_anyres=True)
    qwen = build_tiny_qwen2_5_vl(str(root / "qwen2_5_vl-window-tiny"))
    return {"next_mistral": _set_text_config(next_mistral, model_type="mistral", sliding_window=WINDOW),
            "qwen_window": _set_text_config(qwen, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                            layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2)}


def image(seed: int, size):
    from PIL import Image

    h, w = size
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def make_inputs(processor, samples):
    """samples: indices into QUESTIONS / IMAGE_SIZES -> processor outputs (left-padded batch)."""
    texts, images = [], []
    for i in samples:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}]
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
        images.append(image(i, IMAGE_SIZES[i]))
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def load_ours(path, attn="sdpa", **kw):
    from llava_fitprune.adapters.hf import load_pretrained

    return load_pretrained(path, attn_implementation=attn, **kw)


def load_stock(path, attn="sdpa"):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def generate(model, inputs, n):
    """(new tokens [B, n], raw logits [B, n, V])"""
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def kept_after_layers(trace, num_tokens: int, sample: int = 0, offset: int = 0) -> list[list[int]]:
    """Original positions alive after each layer (from the dropped positions), shifted by -offset."""
    alive, out = set(range(offset, num_tokens)), []
    for dropped in trace.dropped_positions:
        if dropped is not None:
            alive -= {int(p) for p in dropped[sample] if p >= 0}
        out.append(sorted(p - offset for p in alive))
    return out
