"""The FLOPs model against torch's FlopCounterMode on real forwards, and the CLI's 7B figure."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_fitprune import Recipe, builtin_recipe
from llava_fitprune.flops import NAMED_SHAPES, LMShape, dense_prefill_flops, prefill_report
from .conftest import image_tensor, load_ours, prompt_ids


def _counted(model, ids, images):
    # count only the language model: embed outside the counter, as the vision tower is not modelled
    with torch.no_grad():
        *_, embeds, _, visual = model.prepare_multimodal(ids, None, None, None, None, images)
        with FlopCounterMode(display=False) as counter:
            model(inputs_embeds=embeds, visual_mask=visual)
    return counter.get_total_flops(), embeds.shape[1], int(visual.sum())


@pytest.mark.parametrize("fixture,recipe", [
    ("tiny_dir", None), ("tiny_dir", Recipe([100, 250, 60, 0], 576)),
    ("tiny_gqa_dir", None), ("tiny_gqa_dir", Recipe([20, 30, 0], 64)),
])
def test_flops_model_matches_flop_counter(fixture, recipe, request):
    tok, model, _, _ = load_ours(request.getfixturevalue(fixture), recipe=recipe)
    size = model.get_vision_tower().config.image_size
    counted, n, n_visual = _counted(model, prompt_ids(tok, "What is the colour of the circle?")[None],
                                    image_tensor(0, size))
    shape = LMShape.from_config(model.config)
    report = prefill_report(shape, n - n_visual, n_visual, recipe.drop_per_layer if recipe else None)
    predicted = report.pruned_flops
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)
    if recipe is not None:
        assert report.reduction > 0.2


def test_7b_dense_prefill_and_published_reductions(capsys):
    from llava_fitprune.flops_cli import main

    shape = NAMED_SHAPES["llava-v1.5-7b"]
    dense = dense_prefill_flops(shape, 35 + 576 + 30)
    assert 8.5e12 < dense < 8.9e12  # ~2 * 6.7e9 params * 641 tokens, plus attention
    assert main(["--config", "llava-v1.5-7b", "--reduction-ratio", "0.6", "--text-tokens", "65"]) == 0
    out = capsys.readouterr().out
    assert f"{dense / 1e12:.3f}" in out and "0.6" in out
    rep = prefill_report(shape, 65, 576, builtin_recipe(0.6).drop_per_layer)
    assert 0.5 < rep.reduction < rep.visual_only_reduction


def test_flops_cli_rejects_mismatched_recipe(capsys):
    from llava_fitprune.flops_cli import main

    with pytest.raises(SystemExit):
        main(["--config", "llava-v1.5-13b", "--reduction-ratio", "0.6"])
    assert "40" in capsys.readouterr().err
