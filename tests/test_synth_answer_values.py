"""Value targets of the answer heads (synth/answer_values.py): targets, head outputs, loss, training."""
from __future__ import annotations

import math

import pytest
import torch

SCENE = {"shapes": [{"cells": [1, 2, 2], "shape": "star", "colour": "red"},
                    {"cells": [4, 8, 1], "shape": "circle", "colour": "red"},
                    {"cells": [0, 9, 2], "shape": "square", "colour": "blue"}],
         "text": {"cells": [5, 0, 2], "value": "7"}}


def test_word_attributes_describe_the_named_objects():
    from llava_fitprune.synth.answer_values import COLOUR_NAMES, word_attributes

    star = word_attributes(SCENE, "star", grid=12)
    assert star["x"] == pytest.approx(3 / 12) and star["digit"] is None
    assert star["colour"].tolist() == [float(c == "red") for c in COLOUR_NAMES]
    red = word_attributes(SCENE, "red", grid=12)  # the star (centre column 3) and the circle (8.5)
    assert red["x"] == pytest.approx((3 + 8.5) / 2 / 12) and red["colour"][COLOUR_NAMES.index("red")] == 1
    blue_square = word_attributes(SCENE, "square", grid=12)["colour"]
    assert blue_square[COLOUR_NAMES.index("blue")] == 1 and blue_square.sum() == 1
    number = word_attributes(SCENE, "number", grid=12)
    assert number == {"x": pytest.approx(1 / 12), "colour": None, "digit": 7}
    assert word_attributes(SCENE, "triangle", grid=12) is None and word_attributes(SCENE, "green", grid=12) is None
    assert word_attributes({"shapes": SCENE["shapes"]}, "number", grid=12) is None  # no digit drawn


def test_value_targets_follow_the_answer_targets(grounded_batch, tiny2):
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.answer_values import value_targets, word_attributes
    from llava_fitprune.synth.grounding import answer_queries, answer_targets, prompt_end_token_id

    _, batch, scenes, word_ids, _ = grounded_batch
    tok = tiny2[1][0]
    args = (batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 2, (3, 1), prompt_end_token_id(tok))
    values, masks = value_targets(*args), answer_targets(*args)
    assert len(values) == len(masks) > 0
    assert [(b, q, h) for b, q, h, _ in values] == [(b, q, h) for b, q, _, h in masks]
    queries = answer_queries(batch["input_ids"], batch["labels"], word_ids, IMAGE_TOKEN_INDEX, 144, (3, 1),
                             prompt_end_token_id(tok))
    words = [(b, q, h, w) for b, q, w, h in queries if word_attributes(scenes[b], w, 24) is not None]
    assert [(b, q, h) for b, q, h, _ in words] == [(b, q, h) for b, q, h, _ in values]
    for (b, _, _, w), (_, _, _, attrs) in zip(words, values):
        ref = word_attributes(scenes[b], w, 24)
        assert (attrs["x"], attrs["digit"]) == (ref["x"], ref["digit"])
        assert (attrs["colour"] is None) == (ref["colour"] is None) and (ref["colour"] is None or torch.equal(attrs["colour"], ref["colour"]))
    assert {w for *_, w in words} & {"number"} and any(a["colour"] is not None for *_, a in values)


def test_answer_head_outputs_match_the_stock_attention_output(grounded_batch, tiny2, stock_eager):
    """Our per-head output = the slice of what the stock layer feeds o_proj (captured with a hook, default attention)."""
    from llava_fitprune.synth.answer_values import answer_head_outputs

    _, batch, _, _, targets = grounded_batch
    model = tiny2[1][1]
    embeds, stock = stock_eager
    layers = model.get_model().layers
    captured = {}
    hooks = [layers[i].self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i in range(len(layers))]
    try:
        with torch.no_grad():
            model.get_model()(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    rows = torch.tensor([b for b, _, _ in targets])
    positions = torch.tensor([t for _, t, _ in targets])
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in range(len(layers)):
            hidden = embeds if layer == 0 else stock.hidden_states[layer]  # [B, N, D] the layer's input
            for head in range(model.config.num_attention_heads):
                ours = answer_head_outputs(model, hidden, rows, positions, layer, head)  # [n, d]
                expected = captured[layer][rows, positions, head * d:(head + 1) * d]
                torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_value_loss_is_the_squared_error_of_each_attribute(grounded_batch, tiny2, stock_eager):
    from llava.constants import IMAGE_TOKEN_INDEX

    from llava_fitprune.synth.answer_values import X_STD, ValueProbe, answer_head_outputs, value_loss, value_targets
    from llava_fitprune.synth.grounding import prompt_end_token_id

    _, batch, scenes, word_ids, _ = grounded_batch
    tok, model, _ = tiny2[1]
    targets = value_targets(batch["input_ids"], batch["labels"], scenes, word_ids, IMAGE_TOKEN_INDEX, 24, 1, (1, 0),
                            prompt_end_token_id(tok))
    d = model.config.hidden_size // model.config.num_attention_heads
    torch.manual_seed(0)
    probe = ValueProbe(d, (1, 0))
    embeds, stock = stock_eager
    with torch.no_grad():
        for layer in (0, 1):
            hidden = embeds if layer == 0 else stock.hidden_states[layer]
            expected = []
            for b, q, h, attrs in targets:  # one target at a time, written out
                out = answer_head_outputs(model, hidden, torch.tensor([b]), torch.tensor([q]), layer, h)
                pred = probe.readouts[str(h)](out)[0]  # [1 + 6 + 10]
                term = 2.5 * (pred[0] - (attrs["x"] - 0.5) / X_STD) ** 2
                if attrs["colour"] is not None:
                    term = term + ((pred[1:7] - attrs["colour"]) ** 2).sum()
                if attrs["digit"] is not None:
                    term = term + ((pred[7:] - torch.eye(10)[attrs["digit"]]) ** 2).sum()
                expected.append(term)
            torch.testing.assert_close(value_loss(model, probe, hidden, targets, layer, x_weight=2.5),
                                       torch.stack(expected).mean(), atol=1e-5, rtol=1e-4)
        assert value_loss(model, probe, embeds, [], 0).item() == 0
    assert X_STD == pytest.approx(1 / math.sqrt(12))


def test_value_target_trains_and_the_probe_is_not_saved(fresh_training):
    from llava_fitprune.synth.train import TrainConfig, train_steps

    model, ds, collate, scenes = fresh_training
    names = set(model.state_dict())
    cfg = TrainConfig(steps=8, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, pool_schedule="",
                      grounding_weight=1.0, grounding_layer=1, grounding_answer_heads="1,0", grounding_value_weight=1.0)
    torch.manual_seed(0)
    log = train_steps(model, ds, collate, cfg, scenes=scenes)
    assert log[-1]["value_loss"] < 0.8 * log[0]["value_loss"], [r["value_loss"] for r in log]
    assert set(model.state_dict()) == names  # the probe never joins the model
    for off in ({"grounding_answer_heads": ""}, {"grounding_weight": 0.0}, {"grounding_value_weight": 0.0}):
        log = train_steps(model, ds, collate, TrainConfig(steps=1, batch_size=2, pool_schedule="",
                                                                      grounding_layer=1, **off), scenes=scenes)
        assert "value_loss" not in log[0]  # no answer heads, no alignment, or weight 0: no value target
    for bad in ({"grounding_value_weight": -1.0}, {"grounding_value_x_weight": -1.0}):
        with pytest.raises(ValueError, match="must be >= 0"):
            train_steps(model, ds, collate, TrainConfig(steps=1, batch_size=2, pool_schedule="",
                                                                    grounding_layer=1, **bad), scenes=scenes)
