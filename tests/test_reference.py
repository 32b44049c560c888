"""The authors' setup: 32 layers, the published 0.6 recipe, 35 prompt tokens before 576 visual tokens.

Our implementation (batched code, SDPA, PrunedCache) must keep the same tokens at every layer,
leave the same per-layer KV lengths and produce the same greedy tokens as the plain reference.
"""
import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

from llava_fitprune import builtin_recipe
from .conftest import image_tensor, load_ours, load_stock, prompt_ids
from .reference import reference_fitprune

NEW_TOKENS = 6


def _prefix_with(tokenizer, n_before):
    """A system prompt whose tokens before the image number exactly `n_before` (with BOS)."""
    words = "the assistant gives helpful detailed and polite answers to the human questions".split()
    text = "A chat"
    while True:
        ids = prompt_ids(tokenizer, "What is written in the picture?", system=text)
        at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
        if at == n_before:
            return ids
        if at > n_before:
            text = text[:-1]  # overshoot: trim characters until it fits
        else:
            text += " " + words[len(text) % len(words)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_authors_recipe_reproduced(tiny32_dir, attn):
    recipe = builtin_recipe(0.6)
    tok, model, _, _ = load_ours(tiny32_dir, attn=attn, reduction_ratio=0.6)
    ids = _prefix_with(tok, 35)[None]
    images = image_tensor(0, 336)
    stock = load_stock(tiny32_dir, attn="eager")
    kept_ref, kv_ref, tokens_ref, logits_ref = reference_fitprune(stock, ids, images, recipe.drop_per_layer, NEW_TOKENS)

    out = model.generate(ids, images=images, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                         return_dict_in_generate=True, output_scores=True)
    trace = model.last_trace
    assert trace.tokens_entering[0] == 35 + 576 + (ids.shape[1] - 36)
    # kept tokens after every layer
    kept = torch.arange(trace.tokens_entering[0])
    for layer, dropped in enumerate(trace.dropped_positions):
        if dropped is not None:
            gone = set(dropped[0][dropped[0] >= 0].tolist())
            kept = torch.tensor([p for p in kept.tolist() if p not in gone])
        assert kept.tolist() == kept_ref[layer], f"layer {layer}"
    # per-layer KV lengths after the prefill (+ decoded tokens but the last)
    lengths = [n - (NEW_TOKENS - 1) for n in out.past_key_values.layer_lengths()]
    assert lengths == kv_ref
    assert lengths == trace.tokens_entering[:-1]
    assert out.sequences[0, 1:].tolist() == tokens_ref  # transformers 4.37 puts BOS first, as for stock LLaVA
    torch.testing.assert_close(torch.cat(out.scores), logits_ref, atol=2e-4, rtol=1e-4)
