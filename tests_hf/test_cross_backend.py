"""Both backends on one model: the tiny haotian-liu LLaVA checkpoint (made by the LLaVA backend's
tiny.py) converted to llava-hf drops the same tokens at every layer and gives the same greedy tokens.

The LLaVA side runs in the LLaVA backend's venv (transformers 4.37.2 + llava-torch), named by
$LLAVA_PYTHON (default: .venv/bin/python of this checkout, else /work/main/.venv/bin/python); the test
is skipped where that venv does not exist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llava_fitprune.core.recipe import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = Recipe([100, 250, 60, 0], num_visual_tokens=576)  # the tiny LLaVA-1.5: 4 layers, 576 visual tokens
NEW = 5


def llava_python():
    for candidate in (os.environ.get("LLAVA_PYTHON"), os.path.join(ROOT, ".venv", "bin", "python"),
                      "/work/main/.venv/bin/python"):
        if candidate and os.path.exists(candidate):
            ok = subprocess.run([candidate, "-c", "import llava"], capture_output=True).returncode == 0
            if ok:
                return candidate
    return None


@pytest.fixture(scope="module")
def llava_side(tmp_path_factory):
    python = llava_python()
    if python is None:
        pytest.skip("the LLaVA backend's venv (llava-torch) is not installed: set LLAVA_PYTHON")
    out = tmp_path_factory.mktemp("cross")
    recipe_path = str(out / "recipe.json")
    RECIPE.save(recipe_path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([python, os.path.join(ROOT, "tests_hf", "llava_side.py"), str(out), recipe_path, str(NEW)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "llava_side.json") as f:
        return out, json.load(f)


@torch.no_grad()
def test_both_backends_drop_the_same_tokens(llava_side):
    from transformers import LlavaForConditionalGeneration

    from llava_fitprune.adapters.hf import enable_pruning
    from llava_fitprune.adapters.hf.convert import convert_llava_to_hf

    out, side = llava_side
    hf_dir = convert_llava_to_hf(side["llava_dir"], side["vision_dir"], str(out / "llava-hf"))
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    enable_pruning(model).set_pruning(RECIPE)
    ids = []
    for t in side["input_ids"]:  # LLaVA's image index -> llava-hf's expanded <image> placeholders
        ids += [model.config.image_token_id] * side["num_visual_tokens"] if t == side["image_index"] else [t]
    ids = torch.tensor([ids])
    pixel_values = torch.load(out / "image.pt")
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                         max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    dropped = [None if p is None else sorted(int(x) for x in p[0] if x >= 0)
               for p in model.fitprune_trace.dropped_positions]
    assert [None if d is None else len(d) for d in dropped] == [d or None for d in RECIPE.drop_per_layer]
    assert dropped == side["dropped"]
    new_tokens = gen.sequences[0, ids.shape[1]:].tolist()
    assert new_tokens == side["sequences"][-NEW:]
    assert len(set(new_tokens)) > 1, "degenerate tokens would make the comparison weak"
    vocab = side["vocab_size"]  # llava-hf adds <image> at the end of the vocabulary
    torch.testing.assert_close(torch.stack(gen.logits, 1)[0, :, :vocab], torch.tensor(side["scores"]),
                               atol=1e-4, rtol=1e-4)
