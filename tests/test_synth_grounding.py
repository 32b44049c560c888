"""Training aids of the synthetic trainer: cut conversations, and the word-region alignment loss (grounding.py)."""
from __future__ import annotations

import pytest
import torch


def _record(n: int) -> dict:
    turns = []
    for k in range(n):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + f"q{k}?"}, {"from": "gpt", "value": f"a{k}"}]
    return {"id": "s0", "image": "000000.png", "conversations": turns}


def test_split_conversations_cuts_turns_and_reopens_with_the_image():
    from llava_fitprune.synth.data import split_conversations

    rec = _record(5)
    assert split_conversations([rec], 0) == [rec]
    out = split_conversations([rec], 2)
    assert [r["id"] for r in out] == ["s0#0", "s0#1", "s0#2"] and all(r["image"] == "000000.png" for r in out)
    assert [len(r["conversations"]) for r in out] == [4, 4, 2]
    for r in out:
        humans = [t["value"] for t in r["conversations"] if t["from"] == "human"]
        assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
    pairs = [(t["value"].replace("<image>\n", ""), u["value"])
             for r in out for t, u in zip(r["conversations"][::2], r["conversations"][1::2])]
    assert pairs == [(f"q{k}?", f"a{k}") for k in range(5)]  # every question once, in order, with its answer
    with pytest.raises(ValueError, match=">= 0"):
        split_conversations([rec], -1)
    with pytest.raises(ValueError, match="alternate"):
        split_conversations([{**rec, "conversations": rec["conversations"][:-1]}], 2)


def test_cut_dataset_has_one_image_per_item(short_split, tiny2):
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.data import llava_dataset

    _, (tok, _, proc) = tiny2
    whole = llava_dataset(short_split, tok, proc)
    cut = llava_dataset(short_split, tok, proc, questions_per_sample=1)
    questions = sum(len(r["conversations"]) // 2 for r in whole.list_data_dict)
    assert len(cut) == questions > len(whole)
    for i in range(len(cut)):
        item = cut[i]
        assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1 and item["image"].dim() == 3
        assert 1 <= ((item["labels"] != -100).sum()) <= 8  # one short answer (and the template's ':' / '</s>')


def test_object_masks_and_pooling():
    from llava_fitprune.synth.grounding import object_masks, pool_mask

    scene = {"shapes": [{"cells": [1, 2, 2], "shape": "star", "colour": "red"},
                        {"cells": [4, 4, 1], "shape": "circle", "colour": "red"}]}
    masks = object_masks(scene, grid=6)
    star = masks["star"].view(6, 6)
    assert star.sum() == 4 and star[1:3, 2:4].all()
    assert masks["red"].sum() == 5 and masks["circle"].sum() == 1 and "square" not in masks and "number" not in masks
    with_digit = object_masks({**scene, "text": {"cells": [0, 0, 2], "value": "7"}}, grid=6)
    assert with_digit["number"].view(6, 6)[:2, :2].all() and with_digit["number"].sum() == 4
    pooled = pool_mask(masks["star"], 2).view(3, 3)  # the star's 2 x 2 block straddles pooled cells (0,1), (1,1)
    assert pooled.tolist() == [[False, True, False], [False, True, False], [False, False, False]]
    assert pool_mask(masks["star"], 1) is masks["star"]


def test_grounding_targets_are_question_words_naming_objects(grounded_batch, tiny2):
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.grounding import object_masks

    _, batch, scenes, word_ids, targets = grounded_batch
    assert targets
    P = 576
    for b, t, mask in targets:
        token = int(batch["input_ids"][b, t - P + 1])  # back to the position before the image is spliced in
        word = word_ids[token]
        assert batch["labels"][b, t - P + 1] == -100  # a question word, not an answer
        assert t - P + 1 > (batch["input_ids"][b] == IMAGE_TOKEN_INDEX).nonzero()[0, 0]
        assert torch.equal(mask, object_masks(scenes[b], 24)[word]) and mask.any()


def _named_objects(question: str, scene: dict) -> list[str]:
    """Reference for answer_targets, from the question's text: distinct grounded words in order."""
    import re

    from llava_fitprune.synth.grounding import GROUNDED_WORDS, object_masks
    from llava_fitprune.synth.questions import PLURAL

    singular = {**{w: w for w in GROUNDED_WORDS}, **{p: s for s, p in PLURAL.items()}}
    named = []
    for token in re.findall(r"[a-z]+", question.lower()):
        word = singular.get(token)
        if word and word not in named:
            named.append(word)
    masks = object_masks(scene, 24)
    return [(k, w) for k, w in enumerate(named[:2]) if w in masks]  # (which answer head, word naming an object)


def test_answer_targets_sit_where_the_answer_is_predicted(grounded_batch, tiny2):
    from llava_fitprune.synth.grounding import answer_targets, object_masks, prompt_end_token_id
    from llava.constants import IMAGE_TOKEN_INDEX

    ds, batch, scenes, word_ids, _ = grounded_batch
    _, (tok, _, _) = tiny2
    end = prompt_end_token_id(tok)
    assert tok.convert_ids_to_tokens(end).endswith(":")
    targets = answer_targets(batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 1, (3, 1), end)
    P = 576
    for b in range(2):
        mine = [(t, h, m) for r, t, m, h in targets if r == b]  # in the order answer_targets gives
        positions = sorted({t for t, _, _ in mine})
        questions = [turn["value"] for turn in ds.list_data_dict[b]["conversations"][::2]]
        answers = [turn["value"] for turn in ds.list_data_dict[b]["conversations"][1::2]]
        expected = [_named_objects(q, scenes[b]) for q in questions]
        assert len(positions) == sum(1 for e in expected if e)  # one query position per question that names an object
        by_position = {t: [(h, m) for u, h, m in mine if u == t] for t in positions}
        asked = iter([(e, a) for e, a in zip(expected, answers) if e])
        for t in positions:
            named, answer = next(asked)
            q = t - P + 1  # back to the position before the image is spliced in
            assert int(batch["input_ids"][b, q]) == end  # "ASSISTANT:" ends here, as at inference
            following = tok.decode(batch["input_ids"][b, q + 1:q + 1 + len(tok(answer).input_ids)])
            assert following.strip().startswith(answer)  # this position predicts the answer
            got = by_position[t]
            assert [h for h, _ in got] == [(3, 1)[k] for k, _ in named]
            for (_, mask), (_, word) in zip(got, named):
                assert torch.equal(mask, object_masks(scenes[b], 24)[word])
    assert any(h == 1 for *_, h in targets)  # a left/right question supervises the second head too
    with pytest.raises(ValueError, match="assistant role"):
        answer_targets(batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 1, (3,), end + 1)


def test_targets_need_exactly_one_image_token(grounded_batch, tiny2):
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.grounding import answer_targets, grounding_targets, prompt_end_token_id

    _, batch, scenes, word_ids, _ = grounded_batch
    _, (tok, _, _) = tiny2
    ids = batch["input_ids"].clone()
    ids[1, -1] = IMAGE_TOKEN_INDEX  # row 1 now holds two images
    with pytest.raises(ValueError, match="row 1 has 2 image tokens"):
        grounding_targets(ids, batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 1)
    with pytest.raises(ValueError, match="row 1 has 2 image tokens"):
        answer_targets(ids, batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 1, (1,), prompt_end_token_id(tok))


def test_layer_head_attention_matches_the_stock_layers(grounded_batch, tiny2, stock_eager):
    """The loss reads a layer's own attention: equal to what LlamaAttention computes (output_attentions)."""
    from llava_fitprune.synth.grounding import layer_head_logprobs

    _, _, _, _, targets = grounded_batch
    _, (_, model, _) = tiny2
    embeds, stock = stock_eager
    with torch.no_grad():
        rows = torch.tensor([b for b, _, _ in targets])
        positions = torch.tensor([t for _, t, _ in targets])
        for layer in range(model.config.num_hidden_layers):
            hidden = embeds if layer == 0 else stock.hidden_states[layer]  # [B, N, D] the layer's input
            for head in range(model.config.num_attention_heads):
                ours = layer_head_logprobs(model, hidden, rows, positions, layer, head).exp()  # [n, N]
                torch.testing.assert_close(ours, stock.attentions[layer][rows, head, positions], atol=1e-6, rtol=1e-4)


def test_alignment_loss_reads_each_targets_own_head(grounded_batch, tiny2, stock_eager):
    """grounding_loss on (row, position, mask, head) targets = -log of the stock attention mass of that head."""
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.grounding import answer_targets, grounding_loss, prompt_end_token_id

    _, batch, scenes, word_ids, word_targets = grounded_batch
    _, (tok, model, _) = tiny2
    targets = [(*t, 3) for t in word_targets] + answer_targets(
        batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 1, (1, 2), prompt_end_token_id(tok))
    assert {h for *_, h in targets} == {1, 2, 3}
    starts = (batch["input_ids"] == IMAGE_TOKEN_INDEX).float().argmax(1)
    embeds, stock = stock_eager
    with torch.no_grad():
        for layer in (0, 1):
            hidden = embeds if layer == 0 else stock.hidden_states[layer]
            expected = torch.stack([
                -stock.attentions[layer][b, h, t, int(starts[b]):int(starts[b]) + 576][m].sum().log()
                for b, t, m, h in targets]).mean()
            ours = grounding_loss(model, hidden, starts, targets, layer=layer)
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_grounded_losses_keep_the_stock_task_loss(grounded_batch, tiny2):
    from llava_fitprune.synth.grounding import prompt_end_token_id
    from llava_fitprune.synth.tower_cache import FrozenTowerFeatures
    from llava_fitprune.synth.train import grounded_losses

    ds, _, scenes, word_ids, _ = grounded_batch
    _, (tok, model, _) = tiny2
    from llava_fitprune.synth.data import llava_collator

    collate = llava_collator(tok)
    cached = FrozenTowerFeatures(model, ds)
    with cached.installed(), torch.no_grad():
        for pool in (1, 2):
            cached.pool = pool
            batch = cached.batch([0, 1], collate)
            for layer in (0, 1):
                task, align, value = grounded_losses(model, batch, scenes, word_ids, pool, head=0, layer=layer)
                assert abs(task.item() - model(**batch).loss.item()) < 1e-5
                assert align.item() > 0 and value.item() == 0  # no value probe, no value loss
                task2, both, _ = grounded_losses(model, batch, scenes, word_ids, pool, head=0, layer=layer,
                                              answer_heads=(1, 2), prompt_end_id=prompt_end_token_id(tok))
                assert task2.item() == task.item() and both.item() != align.item()  # answer targets join the mean
        with pytest.raises(ValueError, match="prompt_end_id"):
            grounded_losses(model, batch, scenes, word_ids, 2, head=0, answer_heads=(1,))


@pytest.mark.parametrize("layer", [0, 1])
def test_alignment_loss_trains_and_needs_the_frozen_tower(fresh_training, layer):
    from llava_fitprune.synth.train import TrainConfig, train_steps

    model, ds, collate, scenes = fresh_training
    cfg = TrainConfig(steps=8, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, pool_schedule="",
                      grounding_weight=1.0, grounding_layer=layer, grounding_answer_heads="")  # question words only
    torch.manual_seed(0)
    log = train_steps(model, ds, collate, cfg, scenes=scenes)
    # layer 0 reads the embeddings directly; a later layer's input is itself still moving: slower at first
    assert log[-1]["align_loss"] < (0.8 if layer == 0 else 0.95) * log[0]["align_loss"], [r["align_loss"] for r in log]
    for bad in ({"grounding_layer": 2}, {"grounding_head": -1}, {"grounding_answer_heads": "1,9"}):  # tiny2: 2 layers
        with pytest.raises(ValueError, match="is not in this model"):
            train_steps(model, ds, collate, TrainConfig(steps=1, batch_size=2, pool_schedule="", **bad),
                        scenes=scenes)
    with pytest.raises(ValueError, match="grounding_weight must be >= 0"):
        train_steps(model, ds, collate, TrainConfig(steps=1, batch_size=2, grounding_weight=-1.0,
                                                                pool_schedule=""), scenes=scenes)
    with pytest.raises(ValueError, match="frozen tower"):
        train_steps(model, ds, collate, TrainConfig(steps=1, batch_size=2, grounding_weight=1.0,
                                                                tune_vision=True, pool_schedule=""), scenes=scenes)


def test_answer_alignment_trains_and_checks_its_heads(fresh_training):
    from llava_fitprune.synth.train import TrainConfig, train_steps

    model, ds, collate, scenes = fresh_training
    cfg = TrainConfig(steps=8, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, pool_schedule="",
                      grounding_weight=1.0, grounding_layer=1, grounding_answer_heads="1,2",
                      grounding_value_weight=0.0)  # the alignment alone (the value target: test_synth_answer_values.py)
    torch.manual_seed(0)
    log = train_steps(model, ds, collate, cfg, scenes=scenes)
    assert log[-1]["align_loss"] < 0.95 * log[0]["align_loss"], [r["align_loss"] for r in log]
    for heads, match in (("1,1", "distinct"), ("a", "comma-separated")):
        with pytest.raises(ValueError, match=match):
            train_steps(model, ds, collate, TrainConfig(steps=1, batch_size=2, pool_schedule="",
                                                                    grounding_answer_heads=heads), scenes=scenes)
