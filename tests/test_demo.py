import os

from llava_fitprune.cli import main as cli_main
from llava_fitprune.cli.demo import main as demo_main


def test_demo_runs_dense_and_pruned(tiny32_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--model-path", tiny32_dir, "--reduction-ratio", "0.6", "0.9", "--max-new-tokens", "2",
                      "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 0 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["dense", "fitprune 0.6", "fitprune 0.9"]
    # visual tokens left after the last layer follow the published recipes: 576-449 and 576-539
    assert [r.split("|")[7].strip() for r in rows] == ["576", "127", "37"]
    assert os.path.getsize(out / "tokens_per_layer.png") > 1000


def test_demo_rejects_bad_ratio(capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo_main(["--reduction-ratio", "60"])
    assert "outside [0, 1)" in capsys.readouterr().err


def test_cli_lists_subcommands(capsys):
    assert cli_main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2


def test_demo_on_a_synthetic_split_shows_gold_and_live_accuracy(tiny2, split, tmp_path, capsys):
    import json

    path, _ = tiny2
    assert demo_main(["--model-path", path, "--synth-split", split, "--num-questions", "2",
                      "--accuracy-questions", "5", "--reduction-ratio", "0.5", "--max-new-tokens", "2",
                      "--repeats", "1", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    with open(os.path.join(split, "answers.jsonl")) as f:
        gold = [json.loads(line)["answer"] for line in f][:2]
    for i, answer in enumerate(gold):
        rows = [line.split("|") for line in text.splitlines() if line.startswith(f"| {i} |")]
        assert [r[2].strip() for r in rows] == ["dense", "fitprune 0.5"]
        assert {r[-2].strip() for r in rows} == {repr(answer)}  # the gold column
    table = text.split("accuracy % on the first 5 questions")[1].splitlines()
    runs = [line.split("|")[1].strip() for line in table if line.startswith("| ") and "---" not in line][1:]
    assert runs == ["dense", "fitprune 0.5"]


def test_demo_rejects_a_split_without_questions(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo_main(["--synth-split", str(tmp_path)])
    assert "has no questions.jsonl" in capsys.readouterr().err


def test_demo_accuracy_table_matches_methods_at_the_mean_prompt(tiny2, split):
    """fastv/uniform rows are matched to FitPrune's FLOPs at the mean text length of the questions asked,
    as `llava-fitprune accuracy` does, not at the length of whichever prompt came last."""
    from llava_fitprune.cli.demo import _prompt
    from llava_fitprune.synth.accuracy import split_questions
    from llava_fitprune.synth.demo_task import accuracy_table
    from .conftest import load_ours

    tok, model, proc, _ = load_ours(tiny2[0])
    questions, _ = split_questions(split, 5)
    lengths = [int((_prompt(tok, q["text"], "vicuna_v1")[0] >= 0).sum()) for q in questions]
    assert len(set(lengths)) > 1  # otherwise any one prompt would do
    calls = []
    accuracy_table(model, tok, proc, split, [("dense", None)], lambda r, n: calls.append(n), 5, "vicuna_v1")
    expected = (2 * sum(lengths) + len(lengths)) // (2 * len(lengths))
    assert calls == [expected, expected]
