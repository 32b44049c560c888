"""Equivalence to unpruned / reference computations: the core guarantees of the pruning model."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from llava_fitprune import OracleSelector, Recipe, zero_recipe
from .conftest import batch_ids, image_tensor, load_ours, load_stock, prompt_ids

QUESTIONS = ["What is the colour of the circle?", "How many?", "Is the red square left of the blue star? Answer yes or no."]
RECIPE4 = Recipe([100, 250, 60, 0], num_visual_tokens=576)


def _gen(model, ids, images, n=6, **kw):
    out = model.generate(ids, images=images, max_new_tokens=n, do_sample=False, use_cache=True,
                         return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences[:, 1:], torch.stack(out.scores, 1), out


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_recipe_equals_stock(tiny_dir, attn):
    stock = load_stock(tiny_dir, attn)
    tok, model, _, _ = load_ours(tiny_dir, attn)
    model.set_pruning(zero_recipe(4, 576))
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(1, 336)
    torch.testing.assert_close(model(ids, images=images).logits, stock(ids, images=images).logits, atol=1e-5, rtol=0)
    a = stock.generate(ids, images=images, max_new_tokens=8, do_sample=False)
    b = model.generate(ids, images=images, max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()


@torch.no_grad()
def test_prompt_without_image_runs_unpruned(tiny_dir):
    stock = load_stock(tiny_dir)
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    ids = prompt_ids(tok, "Tell me a story.", system="No image here.")
    ids = ids[ids >= 0][None]  # no <image> placeholder at all
    images = image_tensor(1, 336)
    torch.testing.assert_close(model(ids, images=images).logits, stock(ids, images=images).logits, atol=1e-5, rtol=0)
    assert model.last_trace.dropped_positions == []
    assert model.generate(ids, images=images, max_new_tokens=4).tolist() == \
        stock.generate(ids, images=images, max_new_tokens=4).tolist()


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_equals_one_by_one(tiny_dir, attn):
    tok, model, _, _ = load_ours(tiny_dir, attn, recipe=RECIPE4)
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    seq_b, scores_b, _ = _gen(model, ids, images, attention_mask=mask)
    for i, q in enumerate(QUESTIONS):
        seq_1, scores_1, _ = _gen(model, prompt_ids(tok, q)[None], images[i:i + 1])
        assert seq_b[i].tolist() == seq_1[0].tolist(), f"sample {i}"
        torch.testing.assert_close(scores_b[i], scores_1[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_batched_forward_keeps_per_sample_tokens(tiny_dir):
    """The same tokens are dropped for a sample alone and inside a padded batch (LLaVA's right padding)."""
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    model(ids, attention_mask=mask, images=images)
    batch_trace = model.last_trace
    for i, q in enumerate(QUESTIONS):
        model(prompt_ids(tok, q)[None], images=images[i:i + 1])
        for layer, (db, d1) in enumerate(zip(batch_trace.dropped_positions, model.last_trace.dropped_positions)):
            if d1 is None:
                assert db is None
                continue
            assert sorted(db[i][db[i] >= 0].tolist()) == sorted(d1[0][d1[0] >= 0].tolist()), f"sample {i} layer {layer}"


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_gqa_dir"])
def test_eager_equals_sdpa(fixture, request):
    path = request.getfixturevalue(fixture)
    results = {}
    for attn in ("eager", "sdpa"):
        tok, model, _, _ = load_ours(path, attn)
        n_layers = len(model.get_model().layers)
        n_visual = model.get_vision_tower().num_patches if hasattr(model.get_vision_tower(), "num_patches") else None
        model.set_pruning(Recipe([n_visual // 4 if n_visual else 16] * (n_layers - 1) + [0],
                                 num_visual_tokens=n_visual or 64))
        size = model.get_vision_tower().config.image_size
        logits = model(prompt_ids(tok, QUESTIONS[2])[None], images=image_tensor(2, size)).logits
        results[attn] = (logits, [d if d is None else d.tolist() for d in model.last_trace.dropped_positions])
    assert results["eager"][1] == results["sdpa"][1]
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cached_decoding_equals_recompute(tiny_dir):
    """Greedy decoding with the per-layer KV cache equals recomputing the whole sequence with the
    prefill's token choices replayed (the cache keeps dropped tokens in the layer that dropped them)."""
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(3, 336)
    seq, scores, _ = _gen(model, ids, images, n=6)
    oracle = OracleSelector(model.last_trace.dropped_positions)
    full = torch.cat([ids, seq[:, :-1]], dim=1)
    logits = model(full, images=images, selector=oracle, use_cache=False).logits
    recomputed = logits[:, -seq.shape[1]:]
    assert recomputed.argmax(-1).tolist() == seq.tolist()
    torch.testing.assert_close(recomputed, scores, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_second_turn_continues_from_cache(tiny_dir):
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(4, 336)
    seq1, _, out1 = _gen(model, ids, images, n=4)
    oracle = OracleSelector(model.last_trace.dropped_positions)
    cache = out1.past_key_values
    seen = cache.seen_tokens
    turn2 = tok(" USER: and the square? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    new = torch.cat([seq1[:, -1:], turn2], dim=1)  # the last answer token was never fed to the model
    out2 = model.generate(new, past_key_values=cache, attention_mask=torch.ones(1, seen + new.shape[1], dtype=torch.long),
                          max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    seq2 = out2.sequences[:, new.shape[1]:]
    assert cache.layer_lengths()[-1] < cache.seen_tokens  # the cache really is pruned
    full = torch.cat([ids, seq1, turn2, seq2[:, :-1]], dim=1)
    logits = model(full, images=images, selector=oracle, use_cache=False).logits[:, -seq2.shape[1]:]
    assert logits.argmax(-1).tolist() == seq2.tolist()
    torch.testing.assert_close(logits, torch.stack(out2.scores, 1), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_beam_search_runs_with_pruned_cache(tiny_dir):
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    out = model.generate(prompt_ids(tok, QUESTIONS[1])[None], images=image_tensor(5, 336), num_beams=2,
                         max_new_tokens=4, do_sample=False)
    assert out.shape[1] >= 2


@torch.no_grad()
def test_labels_follow_surviving_rows(tiny_dir):
    stock = load_stock(tiny_dir)
    tok, model, _, _ = load_ours(tiny_dir)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(6, 336)
    labels = ids.clone()
    labels[labels < 0] = -100
    dense = model(ids, images=images, labels=labels).loss
    torch.testing.assert_close(dense, stock(ids, images=images, labels=labels).loss, atol=1e-5, rtol=0)
    model.set_pruning(RECIPE4)
    pruned = model(ids, images=images, labels=labels).loss
    assert torch.isfinite(pruned) and not torch.equal(pruned, dense)


@torch.no_grad()
def test_saved_pruned_checkpoint_loads_by_path(tiny_dir, tmp_path):
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(7, 336)
    expected = model(ids, images=images).logits
    out = tmp_path / "llava-tiny-pruned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert type(reloaded).__name__ == "FitPruneLlavaLlamaForCausalLM"
    assert reloaded.recipe == RECIPE4
    reloaded.get_vision_tower().load_model()
    torch.testing.assert_close(reloaded.eval()(ids, images=images).logits, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_output_attentions_is_causal_with_sdpa(tiny_dir):
    stock = load_stock(tiny_dir, "sdpa")
    tok, model, _, _ = load_ours(tiny_dir, "sdpa")
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(8, 336)
    ours = model(ids, images=images, output_attentions=True)
    ref = stock(ids, images=images, output_attentions=True)
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=0)
    assert torch.triu(ours.attentions[0][0, 0], diagonal=1).abs().max() == 0
