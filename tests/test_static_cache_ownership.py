"""Who owns the fast path's static buffers, and how much they reserve (issue #24 items 3, 5, 6, 7).

A cache someone holds is never overwritten by a later conversation (its reads return its own values
and it continues exactly like the eager path's cache), also when that later conversation fails or
has another batch size; the buffers move on only from a cache nobody holds. The reservation for new
tokens stays within twice what eager decoding holds, whatever `max_new_tokens` says, and grows in
few shapes.
"""
import random
import weakref

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llava_fitprune.adapters.llava.fast_path import disable_fast_path, enable_fast_path
from llava_fitprune.adapters.llava.static_cache import (ReleasedCacheError, StaticPrunedCache, decode_room,
                                                        round_up)
from .conftest import batch_ids, image_tensor, load_ours, prompt_ids
from .test_equivalence import QUESTIONS, RECIPE4
from .test_fast_path import NEW, TOL, _embeds, _gen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pruned(tiny_dir):
    return load_ours(tiny_dir, recipe=RECIPE4)[:2]


class StopAfter(StoppingCriteria):
    """Stops after `n` new tokens, or raises there (`fail`): a user's criterion that breaks mid-decode."""

    def __init__(self, start: int, n: int, fail: bool = False):
        self.start, self.n, self.fail = start, n, fail

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        done = input_ids.shape[1] >= self.start + self.n
        if done and self.fail:
            raise RuntimeError("criterion failed")
        return done


def _turn2(tok, seq, cache):
    """The second turn's ids and mask after `seq` (the last answer token was never fed to the model)."""
    turn2 = tok(" USER: and the square? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    new = torch.cat([seq[:, -1:], turn2.expand(seq.shape[0], -1)], dim=1)
    return new, torch.cat([cache.key_masks[0].long(), torch.ones_like(new)], dim=1)


def _continue(model, tok, seq, cache):
    new, mask = _turn2(tok, seq, cache)
    return _gen(model, new, None, past_key_values=cache, attention_mask=mask)[:2]


def _snapshot(cache):
    return [t.clone() for t in cache.key_cache + cache.value_cache] + [m.clone() for m in cache.key_masks]


def _run(model, tok, between):
    """Conversation 1 (kept), `between(model)` (other conversations), then conversation 1's second turn
    (its tokens and scores), after checking that `between` left conversation 1's cache as it was."""
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(4, 336)
    seq, _, out = _gen(model, ids, images)
    cache = out.past_key_values
    before = _snapshot(cache)
    between(model)
    for now, then in zip(_snapshot(cache), before):
        assert torch.equal(now, then)  # its own keys, values and masks, not the later conversation's
    return _continue(model, tok, seq, cache)


def _held_cache_survives(pruned, between):
    """Conversation 1's cache reads the same and continues as on the eager path, whatever `between` does."""
    tok, model = pruned
    disable_fast_path(model)
    seq_e, scores_e = _run(model, tok, lambda m: None)
    fast = enable_fast_path(model)
    try:
        seq_f, scores_f = _run(model, tok, lambda m: between(m, fast))
    finally:
        disable_fast_path(model)
    assert seq_f.tolist() == seq_e.tolist()
    torch.testing.assert_close(scores_f, scores_e, **TOL)
    return fast


@torch.no_grad()
def test_a_held_cache_keeps_its_values_after_another_conversation(pruned):
    """Item 3: after another conversation of the same shapes, the held cache's key_cache, value_cache
    and key_masks are its own (main: the new conversation's keys), and its second turn equals eager's."""
    tok = pruned[0]
    other = prompt_ids(tok, QUESTIONS[2])[None], image_tensor(5, 336)
    _held_cache_survives(pruned, lambda model, fast: _gen(model, *other))


@torch.no_grad()
def test_a_generate_that_fails_mid_decode_keeps_the_earlier_cache(pruned):
    """Item 5: a conversation whose stopping criterion raises after 2 tokens leaves the held cache
    usable (main: ReleasedCacheError on its second turn). The failed call's cache is released: reading
    it raises one clear line, and the next conversation takes its buffers over."""
    tok = pruned[0]
    ids, images = prompt_ids(tok, QUESTIONS[1])[None], image_tensor(6, 336)
    failed = []

    def between(model, fast):
        with pytest.raises(RuntimeError, match="criterion failed") as info:  # its traceback holds the cache
            _gen(model, ids, images, stopping_criteria=StoppingCriteriaList([StopAfter(0, 2, True)]))
        failed.append(fast.pool.owner())
        failed.append(info)
        assert isinstance(failed[0], StaticPrunedCache) and failed[0].released
        buffers = [b.data_ptr() for b in failed[0].key_buffers]
        taken = model.generate(ids, images=images, max_new_tokens=NEW, return_dict_in_generate=True).past_key_values
        assert [b.data_ptr() for b in taken.key_buffers] == buffers  # the released buffers were reused
    _held_cache_survives(pruned, between)
    for read in (lambda c: c.key_cache, lambda c: c.value_cache, lambda c: c.key_masks, lambda c: c[0],
                 lambda c: c.get_seq_length()):
        with pytest.raises(ReleasedCacheError, match="generate call failed .* start that conversation again"):
            read(failed[0])


@torch.no_grad()
def test_a_batch_2_conversation_keeps_a_batch_1_cache_and_frees_what_it_cannot_reuse(pruned):
    """Item 6: a padded batch-2 conversation leaves a held batch-1 cache usable (main: released,
    though not reused). When the batch-1 cache is no longer held, its buffers, which a batch of 2
    cannot reuse, are freed, not kept (main: the new cache kept them)."""
    tok = pruned[0]
    ids, mask = batch_ids(tok, QUESTIONS[:2])
    images = torch.cat([image_tensor(i, 336) for i in range(2)])
    model = pruned[1]
    enable_fast_path(model)
    try:
        out = _gen(model, prompt_ids(tok, QUESTIONS[0])[None], image_tensor(4, 336))[2]
        old = [weakref.ref(b) for b in out.past_key_values.key_buffers]
        del out
        batch2 = _gen(model, ids, images, attention_mask=mask)[2].past_key_values
        assert batch2.key_buffers[0].shape[0] == 2
        assert all(ref() is None for ref in old)  # freed
    finally:
        disable_fast_path(model)
    _held_cache_survives(pruned, lambda model, fast: _gen(model, ids, images, attention_mask=mask))


@torch.no_grad()
def test_a_new_conversation_reuses_the_buffers_of_a_cache_nobody_holds(pruned):
    """The buffers (and `fill`) move to the next conversation once the earlier cache is dropped, also
    through a `generate` that returns ids only (the eval loop): the same CUDA graph key, so a graph
    captured in the first conversation is replayed."""
    from .test_fast_path import _step_key

    tok, model = pruned
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(5, 336)
    fast = enable_fast_path(model)
    try:
        first = _gen(model, ids, images)[2].past_key_values
        key = _step_key(fast, first)
        del first
        model.generate(ids, images=images, max_new_tokens=NEW)  # ids only: its cache is never handed out
        assert fast.pool.owner() is None
        assert _step_key(fast, _gen(model, ids, images)[2].past_key_values) == key
    finally:
        disable_fast_path(model)


@torch.no_grad()
def test_a_huge_max_new_tokens_reserves_at_most_twice_eager(pruned):
    """Item 7: max_new_tokens=20000 stopped after 2 tokens: the static buffers' bytes are at most twice
    the eager PrunedCache's (main: 47x), with the same tokens."""
    tok, model = pruned
    ids, images = prompt_ids(tok, QUESTIONS[1])[None], image_tensor(3, 336)

    def run():
        stop = StoppingCriteriaList([StopAfter(0, 2)])  # LLaVA generates from embeddings: new tokens only
        out = model.generate(ids, images=images, max_new_tokens=20000, do_sample=False, stopping_criteria=stop,
                             return_dict_in_generate=True)
        return out.sequences, out.past_key_values

    disable_fast_path(model)
    seq_e, eager = run()
    enable_fast_path(model)
    try:
        seq_f, static = run()
    finally:
        disable_fast_path(model)
    assert isinstance(static, StaticPrunedCache) and seq_f.tolist() == seq_e.tolist()
    assert seq_f.shape[1] == 2 and static.layer_lengths() == eager.layer_lengths()
    assert static.capacity_bytes() <= 2 * eager.nbytes(), (static.capacity_bytes(), eager.nbytes())


@torch.no_grad()
@pytest.mark.parametrize("bucket", [1, 8])
def test_a_long_decode_grows_all_layers_at_once_in_few_shapes(pruned, bucket):
    """200 decode steps past a short room: the logits equal the eager loop's at every step; the
    buffers grow all layers at once, about doubling, so few shapes (each one compile or capture);
    at every step the reserved slots stay within twice the held ones plus two buckets per layer."""
    tok, model = pruned
    ids = prompt_ids(tok, "Tell me a story.", system="No image here.")
    ids = ids[ids >= 0][None]  # text only: a short prompt, so the room is short too
    steps = 200
    embeds = model.get_model().embed_tokens(ids)  # [1, N, D]
    eager = model(inputs_embeds=embeds, use_cache=True)
    fast = enable_fast_path(model, bucket=bucket)
    try:
        out = fast.prefill(steps, inputs_embeds=embeds)
        cache, logits_e, eager_cache = out.past_key_values, eager.logits[:, -1:], eager.past_key_values
        shapes = {tuple(cache.capacities())}
        for _ in range(steps):
            nxt = logits_e.argmax(-1)  # [1, 1]
            logits_f = fast.decode(nxt, None, cache)
            step = model(input_ids=nxt, past_key_values=eager_cache, use_cache=True)
            logits_e, eager_cache = step.logits, step.past_key_values
            torch.testing.assert_close(logits_f, logits_e, **TOL)
            held, reserved = sum(cache.layer_lengths()), sum(cache.capacities())
            assert reserved <= max(2 * held, held + 2 * bucket * len(cache)), (reserved, held)
            shapes.add(tuple(cache.capacities()))
    finally:
        disable_fast_path(model)
    n = ids.shape[1]
    assert 2 <= len(shapes) <= 2 + (n + steps) .bit_length() - n.bit_length(), shapes  # ~log2((n + T) / n) + 1


def test_decode_room_rule():
    """The room: at most the mean held per layer less a bucket (so the rounded capacities stay within
    twice the held tokens), at least a bucket, at most the tokens to come and the context left."""
    rng = random.Random(0)
    for _ in range(2000):
        bucket = rng.choice([1, 8, 64])
        held = [rng.randint(1, 3000) for _ in range(rng.randint(1, 32))]
        room = decode_room(held, rng.choice([0, 5, 20000]), bucket)
        reserved = sum(round_up(h + room, bucket) for h in held)
        assert reserved <= max(2 * sum(held), sum(held) + 2 * bucket * len(held))
    assert decode_room([600, 400, 300], 20000, 64) == 384 - 64
    assert decode_room([600, 400, 300], 128, 64) == 128  # max_new_tokens
    assert decode_room([600, 400, 300], 20000, 64, context_left=100) == 100  # the context left
    assert decode_room([10, 10], 20000, 64) == 64 and decode_room([10], 3, 64) == 3
