"""The plugin's registration with lmms-eval (entry points of the installed package), its --model_args
(each bad one refused in one line before any weights load; dtype=auto) and its dense loglikelihood."""
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from lmms_eval.models import get_model

from llava_fitprune.core.recipe import Recipe
from llava_fitprune.lmms_eval_plugin import MODEL_CLASSES, backend
from llava_fitprune.lmms_eval_plugin.args import ModelArgsError, check_model_args
from llava_fitprune.lmms_eval_plugin.model import FitPruneLlavaHF, FitPruneQwen2_5_VL
from lmms_tiny import build_tiny_llava_hf

HERE = os.path.dirname(os.path.abspath(__file__))


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


@pytest.fixture
def no_weights(monkeypatch):
    """Any load of the weights fails the test: the arguments must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(backend, "load", refuse)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    Recipe([1, 1], num_visual_tokens=4).save(root / "fits.json")  # the tiny model: 2 layers, 4 visual tokens
    Recipe([1, 1, 1], num_visual_tokens=4).save(root / "deeper.json")
    (root / "broken.json").write_text("{")
    return root


BAD_MODEL_ARGS = [  # (--model_args, what the one line says); #24's six and the rest of the plugin's keys
    (dict(reduction_ration=0.6), r"unknown --model_args key\(s\) \['reduction_ration'\]: the plugin takes"),
    (dict(method="fastv", kk=2), r"unknown --model_args key\(s\) \['kk'\].*method fastv the options \['k', 'r'"),
    (dict(reduction_ratio="sixty"), r"reduction_ratio='sixty' is not a number"),
    (dict(reduction_ratio=60), r"outside \[0, 1\).*not 60"),
    (dict(reduction_ratio=0.33), r"no built-in .* recipe for reduction_ratio 0.33"),
    (dict(reduction_ratio=0.6), r"recipe has 32 layers but the model has 2 decoder layers"),
    (dict(method="fitprun"), r"method='fitprun' is not a pruning method: use one of \['fitprune'"),
    (dict(method="uniform", num_visual_tokens=4), r"uniform needs a budget .* or per_layer="),
    (dict(dtype="float64x"), r"dtype='float64x' is not a floating torch dtype: use auto"),
    (dict(dtype="int8"), r"dtype='int8' is not a floating torch dtype"),
    (dict(recipe="{root}/missing.json"), r"recipe file .*missing.json does not exist"),
    (dict(recipe="{root}/broken.json"), r"broken.json is not valid JSON"),
    (dict(recipe="{root}/deeper.json"), r"recipe has 3 layers but the model has 2"),
    (dict(recipe="{root}/fits.json", reduction_ratio=0.6), r"recipe= or reduction_ratio=, not both"),
    (dict(batch_size="auto"), r"batch_size='auto': give a positive integer"),
    (dict(batch_size=0), r"batch_size=0: give a positive integer"),
    (dict(device="gpu"), r"device='gpu' is not a torch device"),
    (dict(attn_implementation="flash"), r"attn_implementation='flash' is not one of \['eager'"),
    (dict(pretrained="{root}/no-such-checkpoint"), r"pretrained=.*no-such-checkpoint: no checkpoint config there"),
    (dict(compile="yes"), r"compile='yes': give compile=True or compile=False"),
]


@pytest.mark.parametrize("args,message", BAD_MODEL_ARGS)
def test_bad_model_args_are_refused_before_the_weights_load(tiny_checkpoint, recipes, no_weights, args, message):
    args = {k: v.format(root=recipes) if isinstance(v, str) else v for k, v in args.items()}
    args = {"pretrained": tiny_checkpoint, "device": "cpu", **args}
    with pytest.raises(ModelArgsError, match=message) as refused:
        FitPruneLlavaHF(**args)
    assert "\n" not in str(refused.value)


def test_cuda_device_without_cuda_is_refused_before_the_weights_load(tiny_checkpoint, no_weights):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelArgsError, match=r"device='cuda': this machine has 0 CUDA device\(s\); use cpu"):
        FitPruneLlavaHF(pretrained=tiny_checkpoint, device="cuda")


def test_good_model_args_pass_the_checks(tiny_checkpoint, recipes):
    """The checks refuse only what is wrong: a recipe that fits, fastv with its options, a dtype by name."""
    args, config = check_model_args(("llava",), "", tiny_checkpoint, recipe=str(recipes / "fits.json"), dtype="bfloat16",
                                    batch_size=2, attn_implementation="sdpa", device="cpu", max_batch_size=None)
    assert (args.recipe, args.dtype, args.batch_size, args.prunes) == (str(recipes / "fits.json"), torch.bfloat16, 2, True)
    args, _ = check_model_args(("llava",), "", tiny_checkpoint, method="fastv", k=1, r=0.5, num_visual_tokens=4,
                               reduction_ratio="0")
    assert args.method_options == {"k": 1, "r": 0.5, "num_visual_tokens": 4} and args.reduction_ratio == 0.0
    assert check_model_args(("llava",), "", tiny_checkpoint)[0].dtype == "auto" and config.model_type == "llava"


def test_lmms_eval_command_line_prints_one_line_and_exits_2(tiny_checkpoint, tmp_path):
    """Through lmms-eval's own command line, on a checkpoint without weights: one line on stderr naming the
    argument, exit status 2, no traceback (lmms-eval itself prints one and exits 0 for an exception)."""
    no_weights = tmp_path / "config-only"
    shutil.copytree(tiny_checkpoint, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_lmms_eval.py"), "--model", "fitprune_llava_hf", "--model_args",
         f"pretrained={no_weights},reduction_ration=0.6", "--tasks", "mme", "--device", "cpu",
         "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if "--model_args" in line]
    assert ours == ["FitPruneLlavaHF: bad --model_args: unknown --model_args key(s) ['reduction_ration']: the plugin "
                    "takes ['pretrained', 'recipe', 'reduction_ratio', 'method', 'device', 'dtype', 'batch_size', "
                    "'attn_implementation', 'chat_template', 'compile'], ['num_visual_tokens', 'num_text_tokens'], and method fitprune "
                    "the options none"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_dtype_auto_keeps_the_checkpoints_dtype(tiny_checkpoint, tmp_path):
    """A checkpoint saved in bfloat16: dtype=auto (the default) loads it in bfloat16, as lmms-eval's llava_hf
    does; dtype=float32 converts. The bfloat16 model scores a continuation."""
    from lmms_eval.api.instance import Instance
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    bf16 = tmp_path / "bf16"
    LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).to(torch.bfloat16).save_pretrained(bf16)
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(bf16)
    with open(bf16 / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    for model_args, dtype in [({"dtype": "float32"}, torch.float32), ({"dtype": "auto"}, torch.bfloat16),
                              ({}, torch.bfloat16)]:
        lm = FitPruneLlavaHF(pretrained=str(bf16), device="cpu", **model_args)
        assert lm.model.dtype == dtype and lm.model.config.get_text_config().dtype == dtype
    lm.task_dict = {"t": {"test": [{}]}}
    picture = Image.new("RGB", (40, 36), (0, 0, 255))
    request = Instance("loglikelihood", ("what is the colour of the square ?", " blue", lambda d: [picture], 0, "t",
                                         "test"), idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
    (loss, _), = (r.text for r in lm.loglikelihood([request]))
    assert math.isfinite(loss) and loss > 0


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
    """Dense: the plugin's loss of a continuation = minus the mean of the log-softmaxed logits that cached
    greedy decoding emitted for the same tokens; greedy is reported as such, another is not."""
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

    other = new.clone()  # the same tokens but the last: a less likely last step, so a higher loss
    other[-1] = next(i for i in lm.tokenizer.convert_tokens_to_ids(["yes", "no"]) if i != int(new[-1]))
    (loss, greedy), (other_loss, other_greedy) = (r.text for r in lm.loglikelihood(
        [request(continuation), request(" " + lm.tokenizer.decode(other))]))
    assert loss == pytest.approx(-expected / len(new), abs=1e-5) and greedy
    assert not other_greedy and other_loss > loss
