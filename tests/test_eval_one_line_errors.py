"""#24: the eval modules, serve.cli and the synthetic-data writer meet bad input with one line naming
the input and the fix (exit status 2, no traceback), before the model loads; a LLaVA checkpoint in a
folder of any name loads (its config.json says LLaVA)."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from llava_fitprune.eval import synthetic
from llava_fitprune.eval.io import EvalInputError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "eval_data" / "synth_llava" / "checkpoint"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic.build(str(root), n=2, only=["gqa", "mmbench"])
    return root


def loader_argv(model, data, answers, *extra) -> list[str]:
    return ["--model-path", str(model), "--question-file", str(data / "gqa/llava_gqa_testdev_balanced.jsonl"),
            "--answers-file", str(answers), "--image-folder", str(data / "gqa/data/images"), "--temperature", "0",
            "--max_new_tokens", "1", "--device", "cpu", *extra]


def one_error_line(err: str) -> str:
    lines = re.findall(r"error: [^\r\n]*", err)  # the rest would be tqdm's progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refuse(main, argv, capsys, monkeypatch) -> str:
    """Run an eval module's main as its command line does; the model must not load."""
    from llava_fitprune.eval import loading, runner

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert runner.cli(lambda: main(argv)) == runner.BAD_INPUT_STATUS
    return one_error_line(capsys.readouterr().err)


BAD_FLAGS = [  # (flags, what the line says)
    (["--num_beams", "0"], "--num_beams must be >= 1 (1: greedy or sampling, no beam search), got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0: greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--model-path", "/nonexistent/llava-v1.5-7b"], "--model-path /nonexistent/llava-v1.5-7b: not found"),
    (["--model-path", "/nonexistent/ckpt"], "--model-path /nonexistent/ckpt: not found"),
    (["--model-base", "/nonexistent/base"], "--model-base /nonexistent/base: not found"),
]


@pytest.mark.parametrize("flags,says", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_eval_flags_are_one_line_before_the_model_loads(flags, says, tiny_dir, data, tmp_path, capsys,
                                                            monkeypatch):
    from llava_fitprune.eval import model_vqa_loader

    line = refuse(model_vqa_loader.main, loader_argv(tiny_dir, data, tmp_path / "a.jsonl", *flags), capsys,
                  monkeypatch)
    assert says in line
    assert not (tmp_path / "a.jsonl").exists()


def test_a_llava_checkpoint_in_a_folder_of_any_name_loads(data, tmp_path, capsys, monkeypatch):
    """The shipped `eval_data/synth_llava/checkpoint` (fit and demo load it too); a folder whose config
    says another model is one line naming both rules."""
    from llava_fitprune.eval import model_vqa_loader

    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(loader_argv(SHIPPED, data, answers)) == 0
    meta = json.loads(Path(f"{answers}.meta.json").read_text())
    assert meta["complete"] and meta["num_answers"] == 2 and meta["model_name"] == "checkpoint"
    other = tmp_path / "checkpoint"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"]}))
    line = refuse(model_vqa_loader.main, loader_argv(other, data, tmp_path / "b.jsonl"), capsys, monkeypatch)
    assert f"--model-path {other} does not look like a LLaVA checkpoint: neither its name 'checkpoint' nor its " \
           f"config.json's model_type 'opt' says llava" in line


def test_serve_cli_says_not_found_for_a_missing_model(data, capsys):
    from llava_fitprune.serve import cli

    image = str(data / "gqa/data/images/n0.jpg")
    for path in ("/nonexistent/foo", "/nonexistent/llava-v1.5-7b"):
        assert cli.main(["--model-path", path, "--image-file", image, "--device", "cpu"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"--model-path {path}: not found" in line and "does not look like" not in line
    assert cli.main(["--model-path", str(SHIPPED), "--image-file", "/nonexistent.jpg", "--device", "cpu"]) == 2
    assert "--image-file /nonexistent.jpg: not found" in one_error_line(capsys.readouterr().err)


def test_synthetic_data_into_an_impossible_folder_is_one_line(tmp_path, capsys):
    assert synthetic.main(["/dev/null/x"]) == 2
    assert one_error_line(capsys.readouterr().err) == \
        "error: /dev/null/x: cannot write there (Not a directory): pass a folder you can write to"
    assert synthetic.main([str(tmp_path / "out"), "--only", "gqa", "nosuch"]) == 2
    assert "--only nosuch: unknown benchmark(s): choose from" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # nothing written before the check


def mmbench_with_image(data: Path, tmp_path: Path, b64: str) -> Path:
    """The synthetic MMBench TSV with its second row's image cell replaced."""
    lines = (data / "mmbench/mmbench_dev_20230712.tsv").read_text().splitlines()
    columns = lines[0].split("\t")
    cells = lines[2].split("\t")
    cells[columns.index("image")] = b64
    path = tmp_path / "mmb.tsv"
    path.write_text("\n".join([lines[0], lines[1], "\t".join(cells)]) + "\n")
    return path


def test_undecodable_mmbench_image_names_the_tsv_line_before_the_model_loads(tiny_dir, data, tmp_path, capsys,
                                                                              monkeypatch):
    from llava_fitprune.eval import model_vqa_mmbench
    from llava_fitprune.eval.args import build_parser

    for bad in (base64.b64encode(b"not an image").decode(), "abc"):  # not an image; not base64
        tsv = mmbench_with_image(data, tmp_path, bad)
        argv = ["--model-path", tiny_dir, "--question-file", str(tsv), "--answers-file", str(tmp_path / "a.jsonl"),
                "--device", "cpu"]
        line = refuse(model_vqa_mmbench.main, argv, capsys, monkeypatch)
        assert f"{tsv} line 3 (index 1001): its base64 image does not decode" in line
        assert "replace the row's image cell with a base64 PNG or JPEG, or remove the row" in line
    buf = io.BytesIO()  # a PNG cut inside its pixels: its header opens, loading it fails, named the same way
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="PNG")
    tsv = mmbench_with_image(data, tmp_path, base64.b64encode(buf.getvalue()[:60]).decode())
    items = model_vqa_mmbench.make_items(build_parser("t").parse_args(["--question-file", str(tsv)]))
    with pytest.raises(EvalInputError, match=rf"{re.escape(str(tsv))} line 3 \(index 1001\): its base64 image"):
        items[1].load_image()
