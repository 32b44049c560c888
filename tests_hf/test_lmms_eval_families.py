"""The lmms-eval models of LLaVA-OneVision and Qwen2-VL, in process (lmms-eval's `generate_until` on its own
`Instance`s, the task's docs in `task_dict` as lmms-eval's evaluator sets them): registered, refusing another
family's checkpoint, answering pruned as the direct API does, each sample with its own recipe scaling."""
from __future__ import annotations

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

from conftest import IMAGE_SIZES, QUESTIONS, image, load_ours, make_inputs
from llava_fitprune.core.recipe import Recipe

RECIPE = Recipe([10, 20, 5, 0], num_visual_tokens=64)
FAMILIES = [("fitprune_llava_onevision", "onevision"), ("fitprune_qwen2_vl", "qwen2vl")]
TASK, SPLIT = "tiny_task", "test"


def requests(n: int) -> list[Instance]:
    def doc_to_visual(doc):
        return [doc["image"]]

    return [Instance("generate_until", (QUESTIONS[i], {"max_new_tokens": 4, "until": []}, doc_to_visual, i, TASK, SPLIT),
                     idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i in range(n)]


@torch.no_grad()
@pytest.mark.parametrize("lmms_model,family", FAMILIES)
def test_plugin_answers_as_the_direct_api(tiny_paths, tmp_path, lmms_model, family):
    recipe_path = tmp_path / "recipe.json"
    RECIPE.save(recipe_path)
    other = tiny_paths["qwen2vl" if family == "onevision" else "onevision"]
    with pytest.raises(ValueError, match="checkpoint, this lmms-eval model runs.*choose --model"):
        get_model(lmms_model)(pretrained=other, device="cpu")

    lmm = get_model(lmms_model)(pretrained=tiny_paths[family], recipe=str(recipe_path), device="cpu", batch_size=2)
    lmm.task_dict = {TASK: {SPLIT: [{"image": image(i, IMAGE_SIZES[i])} for i in range(2)]}}
    results = lmm.generate_until(requests(2))

    model, processor = load_ours(tiny_paths[family], recipe=RECIPE)
    visual = []
    for i, result in enumerate(results):
        inputs = make_inputs(processor, [i])
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        assert result.text == processor.tokenizer.decode(out[0], skip_special_tokens=True)
        record = result.token_counts.fitprune
        n = record["visual_tokens"]
        assert n == int(model.fitprune_visual_mask(inputs["input_ids"]).sum())
        assert record["visual_tokens_kept"] == n - sum(RECIPE.drops_for(n))
        assert record["prefill_tflops"] < record["dense_prefill_tflops"]
        visual.append(n)
    assert visual[0] != visual[1]  # anyres-max / dynamic resolution: the recipe is scaled per sample
