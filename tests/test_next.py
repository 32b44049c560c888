"""LLaVA-NeXT: anyres images (variable visual-token counts, image_newline tokens), Llama and Mistral
backbones, several images in one prompt."""
import os

import pytest
import torch
from PIL import Image

from llava_fitprune import OracleSelector, Recipe
from llava_fitprune.core.flops import LMShape, prefill_report
from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava
from .conftest import load_ours, prompt_ids
from .test_flops import _sdpa_cpu_flops

SIZES = [(200, 100), (90, 170), (150, 150)]  # (width, height): different tilings and unpadding
RECIPE = Recipe([60, 40, 0], num_visual_tokens=200)  # scaled to each image's count


@pytest.fixture(scope="module", params=["llama", "mistral"])
def next_dir(request, tmp_path_factory):
    spec = TinyLlavaSpec(num_layers=3, image_size=112, anyres=True, backbone=request.param,
                         num_kv_heads=2 if request.param == "mistral" else None, seed=5)
    return build_tiny_llava(str(tmp_path_factory.mktemp("next") / f"llava-tiny-next-{request.param}"), spec)


def _stock(path):
    from llava.model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM

    cls = LlavaMistralForCausalLM if "mistral" in path else LlavaLlamaForCausalLM
    cwd = os.getcwd()
    os.chdir(path)
    try:
        model = cls.from_pretrained(path, torch_dtype=torch.float32)
        model.get_vision_tower().load_model()
    finally:
        os.chdir(cwd)
    return model.eval()


def _images(processor, config, sizes):
    from llava.mm_utils import process_images

    g = torch.Generator().manual_seed(0)
    pics = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]
    return process_images(pics, processor, config), list(sizes)


@torch.no_grad()
def test_zero_recipe_equals_stock(next_dir):
    tok, model, proc, _ = load_ours(next_dir)
    stock = _stock(next_dir)
    images, sizes = _images(proc, model.config, SIZES[:1])
    ids = prompt_ids(tok, "What is shown?")[None]
    torch.testing.assert_close(model(ids, images=images, image_sizes=sizes).logits,
                               stock(ids, images=images, image_sizes=sizes).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batched_with_different_image_sizes_equals_one_by_one(next_dir):
    from .conftest import batch_ids

    tok, model, proc, _ = load_ours(next_dir, recipe=RECIPE)
    questions = ["What is shown?", "Is there a red circle on the left?", "Count."]
    images, sizes = _images(proc, model.config, SIZES)
    ids, mask = batch_ids(tok, questions)
    out = model.generate(ids, attention_mask=mask, images=images, image_sizes=sizes, max_new_tokens=4,
                         do_sample=False, return_dict_in_generate=True, output_scores=True)
    visual = model.last_trace.visual_entering
    assert len(set(visual[0])) == 3, "the three images give three different visual-token counts"
    for i, q in enumerate(questions):
        one = model.generate(prompt_ids(tok, q)[None], images=images[i:i + 1], image_sizes=sizes[i:i + 1],
                             max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
        assert model.last_trace.visual_entering == [[v[i]] for v in visual]
        assert one.sequences[0].tolist() == out.sequences[i].tolist()
        torch.testing.assert_close(torch.stack(one.scores, 1)[0], torch.stack(out.scores, 1)[i], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cached_equals_recompute(next_dir):
    tok, model, proc, _ = load_ours(next_dir, recipe=RECIPE)
    images, sizes = _images(proc, model.config, SIZES[1:2])
    ids = prompt_ids(tok, "What is shown?")[None]
    out = model.generate(ids, images=images, image_sizes=sizes, max_new_tokens=5, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    seq = out.sequences[:, 1:]
    oracle = OracleSelector(model.last_trace.dropped_positions)
    logits = model(torch.cat([ids, seq[:, :-1]], 1), images=images, image_sizes=sizes, selector=oracle,
                   use_cache=False).logits[:, -seq.shape[1]:]
    assert logits.argmax(-1).tolist() == seq.tolist()
    torch.testing.assert_close(logits, torch.stack(out.scores, 1), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_flops_model_on_anyres_inputs(next_dir):
    from torch.utils.flop_counter import FlopCounterMode

    tok, model, proc, _ = load_ours(next_dir, recipe=RECIPE)
    images, sizes = _images(proc, model.config, SIZES[:1])
    ids = prompt_ids(tok, "What is shown?")[None]
    *_, embeds, _, visual = model.prepare_multimodal(ids, None, None, None, None, images, sizes)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(inputs_embeds=embeds, visual_mask=visual)
    n_visual, n = int(visual.sum()), embeds.shape[1]
    rep = prefill_report(LMShape.from_config(model.config), n - n_visual, n_visual, RECIPE.drops_for(n_visual),
                         text_before_image=int(visual[0].float().argmax()))
    assert abs(rep.pruned_flops - counter.get_total_flops()) / counter.get_total_flops() < 0.01


def test_recipe_meets_its_budget_at_other_resolutions():
    """A recipe fitted for LLaVA-NeXT's 2880 tokens keeps its reduction within 2% at other counts."""
    from llava_fitprune import builtin_recipe
    from llava_fitprune.core.flops import NAMED_SHAPES, reduction_for

    shape = NAMED_SHAPES["llava-v1.6-vicuna-7b"]
    base = builtin_recipe(0.6)
    fitted = Recipe(base.drops_for(2880), 2880, reduction_ratio=0.6, flops_convention="visual_only")
    target = reduction_for(shape, 0, 2880, fitted.drop_per_layer, "visual_only")
    for n in (576, 1152, 1728, 2304, 2880):
        got = reduction_for(shape, 0, n, fitted.drops_for(n), "visual_only")
        assert abs(got - target) <= 0.02, (n, got, target)


@torch.no_grad()
def test_several_images_in_one_prompt(tiny_dir):
    """Each image's tokens are visual; scores and drops apply over their union; text after the last image scores."""
    from .conftest import image_tensor

    recipe = Recipe([300, 500, 0, 0], num_visual_tokens=1152)
    tok, model, _, _ = load_ours(tiny_dir, recipe=recipe)
    ids = prompt_ids(tok, "<image>\nand <image>\nAre the two pictures the same?")[None]
    images = torch.cat([image_tensor(0, 336), image_tensor(1, 336)])
    model(ids, images=images)
    trace = model.last_trace
    assert trace.visual_entering == [[1152], [852], [352], [352], [352]]
    visual = model.prepare_multimodal(ids, None, None, None, None, images)[-1][0]  # [N] bool
    first, last = int(visual.float().argmax()), int(visual.nonzero().max())
    between = [p for p in range(first, last) if not visual[p]]
    assert between, "the prompt has text between the two images"
    dropped = sum((d[0][d[0] >= 0].tolist() for d in trace.dropped_positions if d is not None), [])
    assert len(dropped) == 800 and all(visual[p] for p in dropped)  # only visual tokens, of both images
    assert min(dropped) < first + 576 < max(dropped)
