"""The FLOPs model against torch's FlopCounterMode on real forwards, and the CLI's 7B figure."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_fitprune import Recipe, builtin_recipe
from llava_fitprune.adapters.llava.layer_step import attention_blocks
from llava_fitprune.core.flops import NAMED_SHAPES, LMShape, dense_prefill_flops, prefill_report
from .conftest import image_tensor, load_ours, prompt_ids


def _sdpa_cpu_flops(query_shape, key_shape, *args, out_shape=None, **kwargs):
    b, h, q, d = query_shape
    return 2 * 2 * b * h * q * key_shape[-2] * d  # QK^T and PV, the full rectangle as dense kernels do


def _counted(model, ids, images):
    # count only the language model: embed outside the counter, as the vision tower is not modelled.
    # FlopCounterMode has no formula for the CPU SDPA kernel: give it the dense one.
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    with torch.no_grad():
        *_, embeds, _, visual = model.prepare_multimodal(ids, None, None, None, None, images)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(inputs_embeds=embeds, visual_mask=visual)
    first_visual = int(visual[0].float().argmax())
    return counter.get_total_flops(), embeds.shape[1], int(visual.sum()), first_visual


@pytest.mark.parametrize("fixture,recipe", [
    ("tiny_dir", None), ("tiny_dir", Recipe([100, 250, 60, 0], 576)),
    ("tiny_gqa_dir", None), ("tiny_gqa_dir", Recipe([20, 30, 0], 64)),
])
def test_flops_model_matches_flop_counter(fixture, recipe, request):
    tok, model, _, _ = load_ours(request.getfixturevalue(fixture), recipe=recipe)
    size = model.get_vision_tower().config.image_size
    counted, n, n_visual, before = _counted(model, prompt_ids(tok, "What is the colour of the circle?")[None],
                                    image_tensor(0, size))
    shape = LMShape.from_config(model.config)

    def block_rows(n_in):  # the row blocks the pruning layers' attention runs in (layer_step)
        return attention_blocks(1, shape.num_heads, n_in, n_in - before, torch.device("cpu"))[1]

    report = prefill_report(shape, n - n_visual, n_visual, recipe.drop_per_layer if recipe else None,
                            text_before_image=before, tail_block_rows=block_rows)
    predicted = report.pruned_flops
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)
    assert abs(report.dense_flops - counted) / counted > 0.05 if recipe is not None else True
    if recipe is not None:
        assert report.reduction > 0.2


def test_7b_dense_prefill_and_published_reductions(capsys):
    from llava_fitprune.cli.flops import main

    shape = NAMED_SHAPES["llava-v1.5-7b"]
    dense = dense_prefill_flops(shape, 35 + 576 + 30)
    assert 8.5e12 < dense < 8.9e12  # ~2 * 6.7e9 params * 641 tokens, plus attention
    assert main(["--config", "llava-v1.5-7b", "--reduction-ratio", "0.6"]) == 0
    out = capsys.readouterr().out
    assert f"{dense / 1e12:.3f}" in out and "0.6" in out
    rep = prefill_report(shape, 65, 576, builtin_recipe(0.6).drop_per_layer)
    assert 0.5 < rep.reduction < rep.visual_only_reduction


def test_flops_cli_rejects_mismatched_recipe(capsys):
    from llava_fitprune.cli.flops import main

    with pytest.raises(SystemExit):
        main(["--config", "llava-v1.5-13b", "--reduction-ratio", "0.6"])
    assert "40" in capsys.readouterr().err
