"""SDPA path: no [B, H, N, N] attention tensor at any layer; pruning layers build only the rows the scores read."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llava_fitprune import Recipe
from llava_fitprune.adapters.llava.layer_step import attention_blocks
from .conftest import image_tensor, load_ours, prompt_ids


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@torch.no_grad()
@pytest.mark.parametrize("attn,expect_full", [("sdpa", False), ("eager", True)])
def test_no_full_attention_probabilities(tiny_dir, attn, expect_full):
    recipe = Recipe([0, 200, 0, 100], num_visual_tokens=576)
    tok, model, _, _ = load_ours(tiny_dir, attn, recipe=recipe)
    ids, images = prompt_ids(tok, "What is the colour of the circle?")[None], image_tensor(0, 336)
    *_, embeds, _, visual = model.prepare_multimodal(ids, None, None, None, None, images)
    heads = model.config.num_attention_heads
    n = embeds.shape[1]
    first_visual = int(visual[0].float().argmax())
    with ShapeRecorder() as rec:
        model(inputs_embeds=embeds, visual_mask=visual)
    sizes = model.last_trace.tokens_entering
    square = {(1, heads, s, s) for s in sizes}
    assert bool(square & set(rec.shapes)) == expect_full
    # the pruning layers' probabilities: row blocks from the first visual token on, each against the
    # keys up to its last row; never all rows at once, with several blocks per layer here
    for l in (1, 3):
        n_in, rows = sizes[l], sizes[l] - first_visual
        _, block = attention_blocks(1, heads, n_in, rows, torch.device("cpu"))
        assert block < rows
        first_block, last_block = (1, heads, block, first_visual + block), (1, heads, rows % block or block, n_in)
        assert {first_block, last_block} <= set(rec.shapes)
        assert (1, heads, rows, n_in) not in rec.shapes
    assert n == sizes[0]
