"""One command line for both backends (issue #23 item 1): the backend comes from config.json alone, and a
transformers-native checkpoint given to this venv (the LLaVA backend's, transformers 4.37) is refused
in one line that names the .venv-hf command, exit 2, before anything loads."""
from __future__ import annotations

import json
import os

import pytest

from llava_fitprune.cli import main
from llava_fitprune.cli.backend import BackendError, backend_of_config, current_backend, detect_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "eval_data", "synth_llava", "checkpoint")
# config.json heads as the hub's checkpoints write them (sizes trimmed)
HF_CONFIGS = {
    "llava-hf": {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                 "vision_config": {"model_type": "clip_vision_model"}, "text_config": {"model_type": "llama"}},
    "llava-next": {"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"],
                   "vision_config": {"model_type": "clip_vision_model"}, "text_config": {"model_type": "llama"}},
    "qwen2.5-vl": {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                   "vision_config": {"depth": 32}, "text_config": {"model_type": "qwen2_5_vl_text"}},
}
# liuhaotian/llava-v1.5-7b's own config.json says model_type "llava" (as llava-hf's do): its architectures decide
LIUHAOTIAN = {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "openai/clip",
              "hidden_size": 4096}


def _write(tmp_path, name, config) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_detect_backend_from_config_alone(tmp_path):
    assert detect_backend(SYNTH) == "llava"
    assert backend_of_config(LIUHAOTIAN) == "llava"
    architectures_only = {k: v for k, v in LIUHAOTIAN.items() if k != "mm_vision_tower"}
    assert backend_of_config(architectures_only) == "llava"  # llava-torch's class names decide model_type "llava"
    assert backend_of_config({"model_type": "llama", "hidden_size": 64}) == "llava"  # a language model alone
    for name, config in HF_CONFIGS.items():
        assert detect_backend(_write(tmp_path, name, config)) == "hf", name
    with pytest.raises(BackendError, match="no config.json"):
        detect_backend(str(tmp_path))
    with pytest.raises(BackendError, match="no model_type"):
        backend_of_config({"hidden_size": 64})
    assert current_backend() == "llava"


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
@pytest.mark.parametrize("command", [
    "fit --model-path {ckpt} --question-file {q} --image-folder {dir} --reduction-ratio 0.5 --out {out}",
    "bench --model {ckpt} --out-dir {out}",
    "accuracy --checkpoint {ckpt} --out-dir {out}",
])
def test_transformers_checkpoint_is_refused_with_the_hf_venv_command(tmp_path, capsys, family, command):
    ckpt = _write(tmp_path, family, HF_CONFIGS[family])
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 0, "image": "a.png", "text": "what?"}\n')
    argv = command.format(ckpt=ckpt, q=q, dir=tmp_path, out=tmp_path / "out").split()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "transformers-native checkpoint" in err
    assert f".venv-hf/bin/llava-fitprune {' '.join(argv)}" in err, err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written


def test_flops_refuses_a_config_only_transformers_5_completes(tmp_path, capsys):
    """flops reads sizes only: a full config works in either venv; Qwen2.5-VL's text config, completed from
    transformers' defaults, needs transformers 5 (4.37 does not know the model type)."""
    ckpt = _write(tmp_path, "qwen", HF_CONFIGS["qwen2.5-vl"])
    with pytest.raises(SystemExit) as e:
        main(["flops", "--config", ckpt])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f".venv-hf/bin/llava-fitprune flops --config {ckpt}" in err, err


def test_llava_checkpoint_passes_the_check(tmp_path, capsys):
    """The check lets this venv's own checkpoints through (the next check fails: the missing question file)."""
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model-path", SYNTH, "--question-file", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2
    assert "--question-file" in capsys.readouterr().err
