"""#16 reliability of the model, recipes and checkpoints: each test fails on the code before the fix."""
import pytest
import torch

from llava_fitprune import Recipe
from .conftest import batch_ids, image_tensor, load_ours, load_stock, prompt_ids

QUESTIONS = ["How many?", "Is the red square left of the blue star? Answer yes or no."]
RECIPE4 = Recipe([100, 250, 60, 0], num_visual_tokens=576)


def _greedy(model, ids, images, **kw):
    return model.generate(ids, images=images, max_new_tokens=5, do_sample=False, **kw)


@torch.no_grad()
@pytest.mark.parametrize("recipe", [None, RECIPE4], ids=["dense", "pruned"])
def test_left_padding_side_batches_like_one_by_one(tiny_dir, recipe, one_thread):
    """tokenizer_padding_side = "left" (LLaVA pads the expanded batch on the left): a short and a long
    prompt batched give each one's tokens alone, and (dense) stock LLaVA's batch."""
    tok, model, _, _ = load_ours(tiny_dir, recipe=recipe)
    model.config.tokenizer_padding_side = "left"
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    batched = _greedy(model, ids, images, attention_mask=mask)
    for i, q in enumerate(QUESTIONS):
        alone = _greedy(model, prompt_ids(tok, q)[None], images[i:i + 1])
        assert batched[i, :alone.shape[1]].tolist() == alone[0].tolist(), f"sample {i}"
    if recipe is None:
        stock = load_stock(tiny_dir)
        stock.config.tokenizer_padding_side = "left"
        assert _greedy(stock, ids, images, attention_mask=mask).tolist() == batched.tolist()
