"""`llava-fitprune report` as a paper table (issue #24 item 4 and "The report, as a paper table"): stale and
failed scores, server scores by hand or from the graders' files, partial benchmarks, both FLOPs
conventions, TFLOPs on one basis with Avg and Δ vs dense, the run's settings, and a legible plot.
Each test builds merged runs as the eval scripts leave them (answers, sidecar, score file)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llava_fitprune.core.flops import NAMED_SHAPES, prefill_report
from llava_fitprune.core.recipe import builtin_recipe
from llava_fitprune.eval import report
from llava_fitprune.eval.io import file_sha256
from llava_fitprune.eval.prefill import planned_visual_entering, sample_prefill, summarize

SHAPE = NAMED_SHAPES["llava-v1.5-7b"]
VISUAL = 576
MODEL = "llava-v1.5-7b"


def make_run(root: Path, run_name: str, bench: str, *, recipe=None, method="fitprune", text_tokens=60, n=3,
             score=None, coverage=None, qid_offset=0, **meta) -> Path:
    """A finished merged run: answers with per-sample prefill metadata, its sidecar, and (score given) a
    score file written as the scorers write it (`io.write_score`: it records the answers' sha256)."""
    folder = root / bench
    folder.mkdir(parents=True, exist_ok=True)
    questions = folder / "questions.jsonl"
    if not questions.exists():
        questions.write_text("".join(json.dumps({"question_id": i, "text": f"q{i}"}) + "\n" for i in range(n)))
    entering = planned_visual_entering(recipe, SHAPE.num_layers, VISUAL)
    rows = [{"question_id": i + qid_offset, "text": f"a{i}",
             "metadata": {"prefill": sample_prefill(text_tokens, VISUAL, entering, True)}} for i in range(n)]
    answers = folder / f"{run_name}.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = len(list(root.rglob("*.meta.json")))
    sidecar = {"format": "llava-fitprune.eval-meta", "kind": "merged", "complete": True, "benchmark": bench,
               "run_name": run_name, "model_name": MODEL, "method": method, "reduction_ratio": None,
               "recipe": recipe.to_dict() if recipe is not None else None,
               "recipe_fingerprint": recipe.fingerprint() if recipe is not None else None,
               "conv_mode": "vicuna_v1", "batch_size": 1, "module": "model_vqa_loader", "max_new_tokens": 128,
               "num_answers": n, "num_chunks": 1, "lm_shape": SHAPE.to_dict(), "prefill": summarize(rows, SHAPE),
               "merged_at": f"2026-01-01T00:00:{order:02d}", "question_file": str(questions),
               "question_file_sha256": file_sha256(questions), **meta}
    Path(f"{answers}.meta.json").write_text(json.dumps(sidecar))
    if score is not None:
        write_score_file(answers, bench, score, coverage)
    return answers


def write_score_file(answers: Path, bench: str, score: float, coverage: dict | None = None) -> None:
    """A score file in the documented format 2 (docs/report.md), as a scorer leaves it."""
    Path(f"{answers}.score.json").write_text(json.dumps(
        {"format": "llava-fitprune.eval-score", "version": 2, "benchmark": bench, "metric": "accuracy",
         "score": score, "answers_file": str(answers), "answers_sha256": file_sha256(answers),
         "source": {"kind": "scorer"}, "coverage": coverage, "details": {}}))


def run_report(root: Path, out: Path, *extra) -> tuple[dict, str]:
    assert report.main([str(root), "--out", str(out), *extra]) == 0
    md = (out / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(heads, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {r["Run"]: r for r in rows}, md


# --- item 4: a score is shown only while it is of these answers, of this question file ----------------

def test_edited_question_file_then_regenerated_answers_show_stale_then_failed(tmp_path):
    root = tmp_path / "eval"
    answers = make_run(root, "tiny-dense", "textvqa", score=50.0)
    rows, _ = run_report(root, tmp_path / "r0")
    assert rows["tiny-dense"]["TextVQA"] == "50.0"

    questions = root / "textvqa" / "questions.jsonl"  # edited in place: the rerun is refused, the score is old
    questions.write_text(questions.read_text().replace("q0", "q0 edited"))
    rows, md = run_report(root, tmp_path / "r1")
    assert rows["tiny-dense"]["TextVQA"] == "stale"
    assert f"the question file {questions} changed since these answers were generated" in md

    # the user deletes the chunk and regenerates; the new merge differs, the scorer fails (no annotation)
    meta = json.loads(Path(f"{answers}.meta.json").read_text())
    answers.write_text(answers.read_text().replace('"a0"', '"a new answer"'))
    Path(f"{answers}.meta.json").write_text(json.dumps(dict(meta, question_file_sha256=file_sha256(questions))))
    rows, md = run_report(root, tmp_path / "r2")
    assert rows["tiny-dense"]["TextVQA"] == "failed"
    assert "the score file is of other answers" in md and "rerun its score step" in md
    rows_csv = list(csv.DictReader(open(tmp_path / "r2" / "report.csv")))
    assert rows_csv[0]["status"] == "failed" and rows_csv[0]["score"] == ""

    write_score_file(answers, "textvqa", 40.0)  # the score step reruns
    rows, _ = run_report(root, tmp_path / "r3")
    assert rows["tiny-dense"]["TextVQA"] == "40.0"


def test_score_files_without_the_answers_hash_are_not_shown(tmp_path):
    root = tmp_path / "eval"
    answers = make_run(root, "old", "gqa")
    Path(f"{answers}.score.json").write_text(json.dumps({"format": "llava-fitprune.eval-score", "score": 61.0,
                                                         "metric": "accuracy", "benchmark": "gqa"}))
    rows, md = run_report(root, tmp_path / "out")
    assert rows["old"]["GQA"] == "stale" and "records no answers sha256" in md


def test_scorers_record_the_answers_hash_and_coverage(tmp_path):
    from llava_fitprune.eval import synthetic
    from llava_fitprune.eval.convert import mme_calculation
    from llava_fitprune.eval.score_pope import score_pope

    synthetic.build(str(tmp_path / "eval"), n=2, only=["pope"])
    pope = tmp_path / "eval" / "pope"
    questions = pope / "llava_pope_test.jsonl"
    answers = tmp_path / "pope.jsonl"
    answers.write_text("".join(json.dumps({"question_id": json.loads(q)["question_id"], "text": "Yes"}) + "\n"
                               for q in open(questions)))
    score = score_pope(str(pope / "coco"), str(questions), str(answers), None)
    assert score["answers_sha256"] == file_sha256(answers) and score["version"] == 2
    assert score["coverage"]["scored"] == score["coverage"]["total"] > 0

    from llava_fitprune.eval import score as score_cli
    from llava_fitprune.eval.convert.convert_gqa_for_eval import convert as convert_gqa

    synthetic.build(str(tmp_path / "eval"), n=2, only=["gqa"])
    gqa = tmp_path / "eval" / "gqa" / "data"
    mine, other = tmp_path / "gqa-mine.jsonl", tmp_path / "gqa-other.jsonl"
    for path, text in ((mine, "Yes"), (other, "No")):
        path.write_text("".join(json.dumps({"question_id": q, "text": text}) + "\n" for q in ("20000", "20001")))
    convert_gqa(str(other), str(gqa / "testdev_balanced_predictions.json"))  # another run's predictions
    args = ["gqa", "--data-dir", str(gqa), "--score-file", f"{mine}.score.json"]
    assert score_cli.main(args) == 1 and not Path(f"{mine}.score.json").exists()
    convert_gqa(str(mine), str(gqa / "testdev_balanced_predictions.json"))
    assert score_cli.main(args) == 0
    assert json.loads(Path(f"{mine}.score.json").read_text())["answers_sha256"] == file_sha256(mine)

    results = tmp_path / "mme"  # MME with one perception task of ten
    results.mkdir()
    (results / "existence.txt").write_text("0.jpg\tIs it red?\tYes\tYes\n0.jpg\tIs it blue?\tNo\tYes\n")
    merged = tmp_path / "mme.jsonl"
    merged.write_text('{"question_id": 0, "text": "Yes"}\n')
    assert mme_calculation.main(["--results_dir", str(results), "--score-file", f"{merged}.score.json",
                                 "--answers-file", str(merged)]) == 0
    mme = json.loads(Path(f"{merged}.score.json").read_text())
    assert mme["coverage"] == {"scored": 1, "total": 10, "unit": "perception tasks"}
    assert mme["answers_sha256"] == file_sha256(merged)


# --- server and GPT-4 scores: --set-score and --import-score -------------------------------------------

def test_set_score_is_validated_then_written_and_shown(tmp_path, capsys):
    root = tmp_path / "eval"
    answers = make_run(root, "tiny-dense", "vqav2")
    make_run(root, "tiny-dense", "mme")
    bad = [(["nosuch", "vqav2", "78.5"], "unknown run 'nosuch': the finished runs here are tiny-dense"),
           (["tiny-dense", "vqa", "78.5"], "unknown benchmark 'vqa'"),
           (["tiny-dense", "vqav2", "high"], "score 'high' for vqav2 is not a number"),
           (["tiny-dense", "vqav2", "nan"], "is not a finite number"),
           (["tiny-dense", "vqav2", "0.785e3"], "outside its scale (0 to 100"),
           (["tiny-dense", "gqa", "50"], "run 'tiny-dense' has no finished gqa answers (it has mme, vqav2)")]
    for args, message in bad:
        assert report.main([str(root), "--set-score", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not list(root.rglob("*.score.json"))
    # two at once: the second is bad, so neither is written
    assert report.main([str(root), "--set-score", "tiny-dense", "vqav2", "78.5",
                        "--set-score", "tiny-dense", "mme", "2500"]) == 2
    assert not list(root.rglob("*.score.json"))
    assert report.main([str(root), "--set-score", "tiny-dense", "vqav2", "78.5",
                        "--set-score", "tiny-dense", "mme", "1510.7"]) == 0
    saved = json.loads(Path(f"{answers}.score.json").read_text())
    assert saved["score"] == 78.5 and saved["source"] == {"kind": "set-score"}
    assert saved["answers_sha256"] == file_sha256(answers) and saved["metric"] == "accuracy"
    rows, _ = run_report(root, tmp_path / "out")
    assert (rows["tiny-dense"]["VQAv2"], rows["tiny-dense"]["MME"]) == ("78.5", "1510.7")
    answers.write_text(answers.read_text().replace('"a0"', '"b"'))  # regenerated: the server score is old
    rows, md = run_report(root, tmp_path / "out2")
    assert rows["tiny-dense"]["VQAv2"] == "stale" and "resubmit these answers" in md


def write_reviews(path: Path, qids, pairs) -> Path:
    path.write_text("".join(json.dumps({"question_id": q, "category": "llava_bench_conv", "tuple": p}) + "\n"
                            for q, p in zip(qids, pairs)))
    return path


def excel_sheet(path: Path, header: list, row: list) -> None:
    """A one-row .xlsx as Excel and pandas write it: strings in xl/sharedStrings.xml, the sheet named by the
    workbook's relationships (not sheet1.xml)."""
    import zipfile

    from llava_fitprune.eval.convert import xlsx

    strings = [v for v in header + row if isinstance(v, str)]
    cell = lambda ref, v: (f'<c r="{ref}" t="s"><v>{strings.index(v)}</v></c>' if isinstance(v, str)
                           else f'<c r="{ref}"><v>{v}</v></c>')
    rows = "".join(f'<row r="{r}">' + "".join(cell(f"{xlsx.column_name(c)}{r}", v) for c, v in enumerate(vals))
                   + "</row>" for r, vals in ((1, header), (2, row)))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", xlsx.CONTENT_TYPES)
        z.writestr("_rels/.rels", xlsx.ROOT_RELS)
        z.writestr("xl/workbook.xml", xlsx.WORKBOOK)
        z.writestr("xl/_rels/workbook.xml.rels", xlsx.WORKBOOK_RELS.replace("sheet1.xml", "data.xml"))
        z.writestr("xl/worksheets/data.xml", f'<worksheet xmlns="{xlsx.NS}"><sheetData>{rows}</sheetData></worksheet>')
        z.writestr("xl/sharedStrings.xml", f'<sst xmlns="{xlsx.NS}">'
                   + "".join(f"<si><t>{t}</t></si>" for t in strings) + "</sst>")


def test_importers_read_each_graders_result_file(tmp_path, capsys):
    root = tmp_path / "eval"
    for bench in ("vqav2", "vizwiz", "mmbench", "mmbench_cn", "mmvet", "llavabench"):
        make_run(root, "r", bench, n=4)
    files = tmp_path / "results"
    files.mkdir()
    (files / "vqav2.json").write_text(json.dumps([{"test-dev": {"yes/no": 91.6, "number": 58.5, "other": 67.0,
                                                                 "overall": 78.45}},
                                                  {"test-standard": {"overall": 78.9}}]))
    (files / "vizwiz.json").write_text(json.dumps([{"test-dev": {"overall": 50.04, "unanswerable": 70.1}}]))
    (files / "mmb.csv").write_text("split,Overall,AR,CP\ndev,0.643,0.7,0.6\n")
    excel_sheet(files / "mmbcn.xlsx", ["split", "Overall"], ["dev", 0.583])
    (files / "mmvet.csv").write_text(",rec,ocr,know,gen,spat,math,total,std,runs\nllava,32.9,21.2,17.3,19.0,"
                                     "24.8,7.7,31.1,0.0,[31.1]\n")
    write_reviews(files / "reviews.jsonl", [0, 1, 2, 3], [[8, 6], [8, 7], [6, 6], [10, 5]])
    imports = [("vqav2", "vqav2.json"), ("vizwiz", "vizwiz.json"), ("mmbench", "mmb.csv"),
               ("mmbench_cn", "mmbcn.xlsx"), ("mmvet", "mmvet.csv"), ("llavabench", "reviews.jsonl")]
    args = [a for bench, name in imports for a in ("--import-score", "r", bench, str(files / name))]
    assert report.main([str(root), *args]) == 0, capsys.readouterr().err
    rows, _ = run_report(root, tmp_path / "out")
    r = rows["r"]
    # LLaVA-W: mean model 6.0 / mean GPT-4 8.0 (summarize_gpt_review.py's "all" line)
    assert (r["VQAv2"], r["VizWiz"], r["MMB"], r["MMB-CN"], r["MM-Vet"], r["LLaVA-W"]) == (
        "78.5", "50.0", "64.3", "58.3", "31.1", "75.0")
    vqav2 = json.loads((root / "vqav2" / "r.jsonl.score.json").read_text())
    assert vqav2["details"]["phase"] == "test-dev" and vqav2["source"]["kind"] == "import"
    assert vqav2["source"]["file_sha256"] == file_sha256(files / "vqav2.json")

    grades = {f"v1_{i}": {"model": ["gpt-4-0613"], "content": ["x"], "score": [s]} for i, s in enumerate([1, .5, 0])}
    (files / "grade.json").write_text(json.dumps(grades))  # 3 of the 4 questions graded
    assert report.main([str(root), "--import-score", "r", "mmvet", str(files / "grade.json")]) == 0
    rows, _ = run_report(root, tmp_path / "out2")
    assert rows["r"]["MM-Vet"] == "50.0 (3/4 questions)"

    bad = [("llavabench", write_reviews(files / "other.jsonl", [0, 9], [[8, 6], [8, 6]]),
            "question ids ['9'] are not in the run's answers"),
           ("vqav2", files / "mmb.csv", "is not valid JSON"),
           ("vizwiz", files / "nosuch.json", "does not exist"),
           ("gqa", files / "vqav2.json", "no importer for gqa")]
    for bench, path, message in bad:
        assert report.main([str(root), "--import-score", "r", bench, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# --- the table: partial cells, both FLOPs conventions, one TFLOPs basis, Avg and Δ, settings --------------

def test_partial_benchmark_is_marked(tmp_path):
    root = tmp_path / "eval"
    make_run(root, "tiny-dense", "mme", score=0.0, coverage={"scored": 3, "total": 10, "unit": "perception tasks"})
    make_run(root, "tiny-dense", "gqa", score=60.0, coverage={"scored": 3, "total": 3, "unit": "questions"})
    rows, _ = run_report(root, tmp_path / "out")
    assert rows["tiny-dense"]["MME"] == "0.0 (3/10 perception tasks)"
    assert rows["tiny-dense"]["GQA"] == "60.0"
    assert rows["tiny-dense"]["Avg"] == "60.0"  # the partial cell stays out of the average


def test_budget_shows_both_flops_conventions_on_one_basis(tmp_path):
    root = tmp_path / "eval"
    recipe = builtin_recipe(0.6)  # the paper's visual-only 0.6; the same recipe from a file
    make_run(root, "dense", "textvqa", text_tokens=40, score=58.0)
    make_run(root, "dense", "sqa", text_tokens=120, score=70.0)
    make_run(root, "flag-0.6", "textvqa", recipe=recipe, text_tokens=40, score=57.0, reduction_ratio=0.6)
    make_run(root, "file-0.6", "sqa", recipe=recipe, text_tokens=120, score=69.0, recipe_file="/r/fit-06.json")
    rows, md = run_report(root, tmp_path / "out")
    text = (40 + 120) // 2  # the mean prompt over the model's benchmarks: the same basis for every row
    dense = prefill_report(SHAPE, text, VISUAL, None)
    pruned = prefill_report(SHAPE, text, VISUAL, recipe.drop_per_layer)
    assert rows["dense"]["TFLOPs"] == f"{dense.pruned_flops / 1e12:.3g}"
    for name in ("flag-0.6", "file-0.6"):  # one budget, one figure, whichever way it was given
        assert rows[name]["TFLOPs"] == f"{pruned.pruned_flops / 1e12:.3g}"
        assert rows[name]["FLOPs −"] == f"{pruned.reduction:.1%}"
        assert rows[name]["Visual FLOPs −"] == f"{pruned.visual_only_reduction:.1%}" == "60.4%"
    assert rows["flag-0.6"]["Method"] == "fitprune (0.6)" and rows["dense"]["FLOPs −"] == "0.0%"
    assert f"{MODEL}: {VISUAL} visual + {text} text tokens" in md
    # Avg over the row's scores; Δ vs dense over the benchmarks both rows have
    assert rows["dense"]["Avg"] == "64.0" and rows["dense"]["Δ vs dense"] == ""
    assert rows["flag-0.6"]["Avg"] == "57.0 (1/2)" and rows["flag-0.6"]["Δ vs dense"] == "-1.0"
    rows, md = run_report(root, tmp_path / "out2", "--basis-text-tokens", "0")
    assert rows["dense"]["TFLOPs"] == f"{prefill_report(SHAPE, 0, VISUAL, None).pruned_flops / 1e12:.3g}"
    assert "given by --basis-text-tokens" in md


def test_settings_name_attention_dtype_compile_and_chunks(tmp_path):
    root = tmp_path / "eval"
    make_run(root, "fast", "textvqa", score=50.0, attn_implementation="sdpa", dtype="float16", compile=True,
             num_chunks=4)
    make_run(root, "fast", "gqa", score=60.0, attn_implementation="sdpa", dtype="float16", compile=True,
             num_chunks=2)
    make_run(root, "eager32", "textvqa", score=50.0, attn_implementation="eager", dtype="float32")
    rows, _ = run_report(root, tmp_path / "out")
    assert rows["fast"]["Settings"] == "vicuna_v1, batch 1, sdpa, float16, compiled, 2-4 chunks"
    assert rows["eager32"]["Settings"] == "vicuna_v1, batch 1, eager, float32"


# --- the plot --------------------------------------------------------------------------------------------

def test_plot_is_legible_for_many_methods(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    root = tmp_path / "eval"
    methods = ["fitprune", "fastv", "random", "uniform", "sparsevlm", "pdrop"]
    for bench, base in (("textvqa", 58.0), ("gqa", 62.0)):
        make_run(root, "dense", bench, score=base)
        for m, method in enumerate(methods):
            for ratio in (0.3, 0.6, 0.9):  # the same budgets: points crowd at the same TFLOPs
                make_run(root, f"{method}-{ratio}", bench, recipe=builtin_recipe(ratio), method=method,
                         score=base - 10 * ratio - 0.2 * m, reduction_ratio=ratio)
    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k)))
    run_report(root, tmp_path / "out")
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    fig = figures[-1]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # closed after saving: give it a canvas again
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 2
    for ax in axes:
        styles = [(str(l.get_color()), l.get_marker(), l.get_linestyle()) for l in ax.lines
                  if l.get_linestyle() != "None"]
        assert len(styles) == len(methods) and len(set(styles)) == len(styles), styles
        assert ax.get_legend() is None  # one legend, outside the panels
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert sorted(t.get_text() for t in ax.texts) == ["0.3", "0.6", "0.9"]  # one label per budget
        overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
        assert not overlaps, f"{len(overlaps)} label pairs collide"
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes)
    assert len(legend.get_texts()) == len(methods) + 1  # each method and dense
