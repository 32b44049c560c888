"""Ties (#16 item 4): equal importances drop the lower position first, alone and in any batch."""
import torch

from llava_fitprune import Recipe
from llava_fitprune.core.scoring import drop_mask_lowest, keep_rows_lowest
from .conftest import image_tensor, load_ours

RECIPE = Recipe([100, 150, 60, 0], num_visual_tokens=576)


def test_equal_scores_drop_the_lowest_positions():
    imp = torch.zeros(3, 40)
    imp[:, :4] = float("inf")  # text before the image
    drop = drop_mask_lowest(imp, torch.tensor([5, 7, 0]), 7)
    assert [row.nonzero().flatten().tolist() for row in drop] == [[4, 5, 6, 7, 8], list(range(4, 11)), []]
    kept, order = keep_rows_lowest(imp, 6)
    assert torch.equal(order[:, :6], torch.arange(4, 10).expand(3, 6))
    assert torch.equal(kept, torch.cat([torch.arange(4), torch.arange(10, 40)]).expand(3, 34))


def _ids_ending_with_image(tokenizer, words):
    """A prompt whose last token is the image: nothing after it, so every cross score is 0."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    return tokenizer_image_token(f"A chat. USER: {words} <image>", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


@torch.no_grad()
def test_batch_drops_what_each_sample_drops_alone_with_equal_scores(tiny_dir):
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE)
    prompts = [_ids_ending_with_image(tok, w) for w in ("describe", "look at this picture please and tell me")]
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):  # LLaVA's right padding
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    images = torch.cat([image_tensor(0, 336)] * len(prompts))
    model(ids, attention_mask=mask, images=images)
    batch = [d for d in model.last_trace.dropped_positions if d is not None]
    for i, p in enumerate(prompts):
        model(p[None], images=images[i:i + 1])
        alone = [d for d in model.last_trace.dropped_positions if d is not None]
        first_visual = int((p < 0).nonzero()[0])
        expected = first_visual
        for layer, (db, d1) in enumerate(zip(batch, alone)):
            got = sorted(d1[0][d1[0] >= 0].tolist())
            assert sorted(db[i][db[i] >= 0].tolist()) == got, f"sample {i} layer {layer}"
            count = RECIPE.drop_per_layer[layer]
            assert got == list(range(expected, expected + count)), "lowest positions first"
            expected += count
