"""The plugin's registration with lmms-eval (entry points of the installed package) and its refusals."""
import types

import pytest
from lmms_eval.models import get_model

from llava_fitprune.lmms_eval_plugin import MODEL_CLASSES, backend
from llava_fitprune.lmms_eval_plugin.model import FitPruneLlavaHF, FitPruneQwen2_5_VL
from lmms_tiny import build_tiny_llava_hf


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_llava_hf(tmp_path_factory.mktemp("tiny") / "llava-hf")


def test_installed_package_registers_its_models_with_lmms_eval():
    for name, cls in MODEL_CLASSES.items():
        assert get_model(name).__name__ == cls
    assert get_model("fitprune_llava_hf") is FitPruneLlavaHF


def test_model_family_must_match_the_checkpoint(tiny_checkpoint):
    with pytest.raises(ValueError, match="'llava' checkpoint.*choose --model"):
        FitPruneQwen2_5_VL(pretrained=tiny_checkpoint, device="cpu")
    assert FitPruneLlavaHF(pretrained=tiny_checkpoint, device="cpu").model.config.model_type == "llava"


@pytest.mark.parametrize("args,message", [
    (dict(recipe="r.json", reduction_ratio=0.6), "not both"),
    (dict(batch_size="auto"), "positive integer"),
    (dict(dtype="float64x"), "not a torch dtype"),
    (dict(compile="yes"), "compile=True or compile=False"),
])
def test_bad_model_args_are_refused_with_the_fix(tiny_checkpoint, args, message):
    with pytest.raises(ValueError, match=message):
        FitPruneLlavaHF(pretrained=tiny_checkpoint, device="cpu", **args)


def test_compile_key_gives_the_compiled_prefill(tiny_checkpoint):
    """`compile=True` in --model_args (lmms-eval passes a bool) loads the model with the compiled prefill."""
    assert FitPruneLlavaHF(pretrained=tiny_checkpoint, device="cpu", compile=True).model.fitprune_compile_stats
    assert FitPruneLlavaHF(pretrained=tiny_checkpoint, device="cpu").model.fitprune_compile_stats is None


def test_prefill_records_read_the_backend_or_count_dense():
    import torch

    from llava_fitprune.core.flops import NAMED_SHAPES, dense_prefill_flops
    from llava_fitprune.core.recipe import builtin_recipe

    shape = NAMED_SHAPES["llava-hf/llava-1.5-7b-hf"]
    ids = torch.tensor([[0, 1, 9, 9, 9, 2], [1, 9, 9, 9, 2, 3]])  # 9: the image placeholder
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    record = types.SimpleNamespace(method="fitprune", recipe_fingerprint="abc", visual_tokens=[3, 3],
                                   visual_tokens_kept=[1, 2], tokens_entering=[[5, 3], [6, 5]],
                                   prefill_tflops=[0.5, 0.7], dense_prefill_tflops=[0.9, 1.0])
    model = types.SimpleNamespace(fitprune_visual_mask=lambda x: x == 9, fitprune_last=record, fitprune_shape=shape,
                                  fitprune_recipe=builtin_recipe(0.6))
    pruned = backend.prefill_records(model, ids, mask)
    assert [r["visual_tokens_kept"] for r in pruned] == [1, 2] and pruned[1]["prefill_tflops"] == 0.7
    assert pruned[0]["recipe"] == "abc" and pruned[0]["method"] == "fitprune"
    record.visual_tokens = [3, 2]  # an older prefill's record: refused while the model prunes
    with pytest.raises(RuntimeError, match="not of this batch"):
        backend.prefill_records(model, ids, mask)
    model.fitprune_recipe = None  # dense: counted here
    dense = backend.prefill_records(model, ids, mask)
    assert [r["method"] for r in dense] == ["dense", "dense"] and [r["visual_tokens"] for r in dense] == [3, 3]
    assert dense[0]["prefill_tflops"] == dense_prefill_flops(shape, 5) / 1e12
    assert dense[1]["tokens_entering"] == [6] * (shape.num_layers + 1)


def test_loglikelihood_equals_the_greedy_decoding_scores(tiny_checkpoint):
    """The plugin's one-forward log-probability of a continuation = the sum of the log-softmaxed logits
    that cached greedy decoding emitted for the same tokens; greedy is reported as such, another is not."""
    import torch
    from lmms_eval.api.instance import Instance
    from PIL import Image

    lm = FitPruneLlavaHF(pretrained=tiny_checkpoint, device="cpu")
    doc = {"question": "what is the colour of the square ?"}
    lm.task_dict = {"t": {"test": [doc]}}
    picture = Image.new("RGB", (40, 36), (0, 0, 255))
    inputs = lm._inputs([lm._prompt(doc["question"], 1)], [picture])
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    continuation = " " + lm.tokenizer.decode(new)
    full = lm._inputs([lm._prompt(doc["question"], 1, continuation)], [picture])["input_ids"][0]
    assert full[inputs["input_ids"].shape[1]:].tolist() == new.tolist()  # the text re-tokenizes to the same ids
    expected = sum(float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new))

    def request(text):
        return Instance("loglikelihood", (doc["question"], text, lambda d: [picture], 0, "t", "test"), idx=0,
                        metadata={"task": "t", "doc_id": 0, "repeats": 1})

    other = new.clone()  # the same tokens but the last: a lower last step, so a lower sum
    other[-1] = next(i for i in lm.tokenizer.convert_tokens_to_ids(["yes", "no"]) if i != int(new[-1]))
    (logprob, greedy), (other_logprob, other_greedy) = lm.loglikelihood(
        [request(continuation), request(" " + lm.tokenizer.decode(other))])
    assert logprob == pytest.approx(expected, abs=1e-4) and greedy
    assert not other_greedy and other_logprob < logprob
