"""The lmms-eval plugin end to end, offline: tasks defined here over local JSON-lines files and PNG images
(a short-answer task, a multiple-choice one), run through lmms-eval's own command line with a tiny random
llava-hf checkpoint, scored by lmms-eval; the logged samples carry method, recipe, visual tokens and
prefill TFLOPs; data parallel over 2 CPU processes (the README's accelerate line) gives the same samples
and score; a failed evaluation exits 0, as the README says."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_fitprune.core.flops import LMShape, dense_prefill_flops
from llava_fitprune.core.recipe import Recipe
from lmms_tiny import build_tiny_llava_hf

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = os.environ.get("LLAVA_FITPRUNE_SLOW") == "1"
TASK = "fitprune_tiny_vqa"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}


def doc_to_choice(doc):
    return doc["choices"]
"""
MC_TASK = "fitprune_tiny_mc"
MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
CHOICES = ["red", "blue", "yes", "two"]  # one token each
MISSING_TASK = "fitprune_tiny_missing"
QUESTIONS = ["what is the colour of the square ?", "how many circle ?", "what is left ?", "is it red ?"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
MISS = "no-such-answer"


def reference_answers(checkpoint, docs):
    """Stock transformers, greedy, one doc at a time: what a dense model must answer."""
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    answers = []
    for doc in docs:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.open(doc["image"]).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers, inputs


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    """A tiny checkpoint, a local dataset whose even docs have the dense model's own answer as gold (odd: a
    miss, so lmms-eval's score must be exactly 1/2), and the task folder."""
    root = tmp_path_factory.mktemp("lmms")
    checkpoint = build_tiny_llava_hf(root / "tiny-llava-hf")
    docs = []
    for i, (question, colour) in enumerate(zip(QUESTIONS, COLOURS)):
        image = root / f"image{i}.png"
        Image.new("RGB", (40 + 8 * i, 36), colour).save(image)
        docs.append({"id": i, "question": question, "image": str(image)})
    answers, _ = reference_answers(checkpoint, docs)
    assert MISS not in answers
    for i, doc in enumerate(docs):
        doc["answer"] = answers[i] if i % 2 == 0 else MISS
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    recipe = Recipe([1, 1], num_visual_tokens=4, method="fitprune")  # the tiny model: 2 layers, 4 visual tokens
    recipe.save(root / "tiny_recipe.json")
    mc_docs = [{**doc, "choices": CHOICES, "gold": gold} for doc, gold in
               zip(docs, likeliest_choices(checkpoint, recipe, docs))]
    (root / "data_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc_docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (tasks / f"{MC_TASK}.yaml").write_text(MC_YAML.format(task=MC_TASK, data=root / "data_mc.jsonl"))
    (tasks / f"{MISSING_TASK}.yaml").write_text(TASK_YAML.format(task=MISSING_TASK, data=root / "no-such-data.jsonl"))
    (tasks / "utils.py").write_text(TASK_UTILS)
    return {"checkpoint": checkpoint, "docs": docs, "answers": answers, "tasks": tasks, "root": root,
            "recipe": recipe, "mc_gold": [d["gold"] for d in mc_docs]}


def likeliest_choices(checkpoint, recipe, docs):
    """Per doc, the index of the choice the pruned model finds likeliest after the prompt (the direct API:
    load_pretrained + one forward; each choice is one token, so its loss is minus its log-probability)."""
    from llava_fitprune.adapters.hf import load_pretrained

    model, processor = load_pretrained(checkpoint, recipe=recipe)
    ids = processor.tokenizer.convert_tokens_to_ids(CHOICES)
    golds = []
    for doc in docs:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.open(doc["image"]).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1, ids]  # [choices]
        assert model.fitprune_last.visual_tokens_kept == [2]
        golds.append(int(logits.argmax()))
    return golds


def lmms_eval_command(setup, out_name, model_args="", launcher=(), batch_size=1, env=None,
                      lmms_model="fitprune_llava_hf", entry=None, tasks=(TASK,), verbosity="INFO"):
    """lmms-eval's command line, run: `python run_lmms_eval.py ARGS`, or `[*launcher, *entry, ARGS]` (entry:
    the script by default, e.g. ["-m", "lmms_eval"] for the README's accelerate line)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(setup["root"] / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    args = ["--model", lmms_model, "--model_args", f"pretrained={setup['checkpoint']}{model_args}",
            "--tasks", ",".join(tasks), "--include_path", str(setup["tasks"]), "--batch_size", str(batch_size),
            "--device", "cpu", "--log_samples", "--output_path", str(setup["root"] / out_name),
            "--verbosity", verbosity]
    entry = list(entry or [os.path.join(HERE, "run_lmms_eval.py")])
    command = [*launcher, *entry, *args] if launcher else [sys.executable, *entry, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def results_files(setup, out_name):
    return glob.glob(str(setup["root"] / out_name / "**" / "*_results.json"), recursive=True)


def run_lmms_eval(setup, out_name, **kwargs):
    """lmms_eval_command, then (results, TASK's logged samples sorted by doc, output)."""
    proc = lmms_eval_command(setup, out_name, **kwargs)
    # lmms-eval exits 0 after an error too: the result files below are what shows it finished
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    results = results_files(setup, out_name)
    samples = glob.glob(str(setup["root"] / out_name / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert len(results) == 1 and len(samples) == 1, (results, samples, proc.stdout[-3000:])
    with open(results[0]) as f:
        result = json.load(f)
    with open(samples[0]) as f:
        logged = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return result, logged, proc.stdout + proc.stderr


def check_logged(setup, result, logged):
    assert result["results"][TASK]["exact_match,none"] == pytest.approx(0.5)
    assert [s["doc_id"] for s in logged] == list(range(len(setup["docs"])))
    config = LlavaForConditionalGeneration.from_pretrained(setup["checkpoint"]).config
    shape = LMShape.from_config(config)
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2  # CLS left out ("default")
    for sample, answer in zip(logged, setup["answers"]):
        response = sample["filtered_resps"]  # lmms-eval logs a single response unwrapped
        assert (response[0] if isinstance(response, list) else response).strip() == answer.strip()
        counts = sample["token_counts"][0]
        record = counts["fitprune"]
        assert record["recipe"] is None and record["method"] == "dense"
        assert record["visual_tokens"] == record["visual_tokens_kept"] == patches
        assert record["prefill_tflops"] == pytest.approx(dense_prefill_flops(shape, counts["input_tokens"]) / 1e12)
        assert record["tokens_entering"] == [counts["input_tokens"]] * (shape.num_layers + 1)


def test_lmms_eval_runs_and_scores_the_plugin_model(task_setup):
    result, logged, _ = run_lmms_eval(task_setup, "single")
    check_logged(task_setup, result, logged)
    assert result["config"]["model"] == "fitprune_llava_hf"


def test_lmms_eval_logs_the_pruned_prefill_of_each_sample(task_setup):
    """A recipe for the tiny model (2 layers, 4 visual tokens): each sample keeps 2 visual tokens. The same run
    scores a multiple-choice task (loglikelihood requests) pruned: lmms-eval picks each doc's likeliest
    choice under the pruned model (the direct API's), so its accuracy is exactly 1."""
    recipe, path = task_setup["recipe"], task_setup["root"] / "tiny_recipe.json"
    assert (LlavaForConditionalGeneration.from_pretrained(task_setup["checkpoint"]).config.text_config
            .num_hidden_layers) == 2
    assert len(set(task_setup["mc_gold"])) > 1  # the gold is not one fixed choice
    result, logged, _ = run_lmms_eval(task_setup, "pruned", model_args=f",recipe={path},method=fitprune",
                                      tasks=(TASK, MC_TASK))
    assert 0.0 <= result["results"][TASK]["exact_match,none"] <= 1.0
    assert result["results"][MC_TASK]["acc,none"] == 1.0
    mc_samples, = glob.glob(str(task_setup["root"] / "pruned" / "**" / f"*_samples_{MC_TASK}.jsonl"), recursive=True)
    with open(mc_samples) as f:
        for sample in map(json.loads, f):  # one loglikelihood request per choice, each a pruned prefill
            assert [c["fitprune"]["visual_tokens_kept"] for c in sample["token_counts"]] == [2] * len(CHOICES)
    assert f"recipe={path}" in result["config"]["model_args"]
    shape = LMShape.from_config(LlavaForConditionalGeneration.from_pretrained(task_setup["checkpoint"]).config)
    for sample in logged:
        counts = sample["token_counts"][0]
        record = counts["fitprune"]
        assert (record["method"], record["recipe"]) == ("fitprune", recipe.fingerprint())
        assert (record["visual_tokens"], record["visual_tokens_kept"]) == (4, 2)
        assert record["dense_prefill_tflops"] == pytest.approx(dense_prefill_flops(shape, counts["input_tokens"]) / 1e12)
        assert record["prefill_tflops"] < record["dense_prefill_tflops"]


def test_lmms_eval_exits_0_on_a_failed_evaluation(task_setup):
    """What the README says of lmms-eval 0.7.3: an evaluation that fails (here: the task's data file is
    missing) prints a traceback and "Error during evaluation", writes no results file, and exits 0."""
    proc = lmms_eval_command(task_setup, "failed", tasks=(MISSING_TASK,))
    assert proc.returncode == 0 and "Error during evaluation" in proc.stdout + proc.stderr
    assert results_files(task_setup, "failed") == []


@pytest.mark.skipif(not SLOW, reason="one more lmms-eval start: LLAVA_FITPRUNE_SLOW=1")
def test_lmms_eval_debug_verbosity_exits_non_zero_on_a_failed_evaluation(task_setup):
    """The README's other way to detect a failure: `--verbosity DEBUG` re-raises, exit status non-zero."""
    proc = lmms_eval_command(task_setup, "failed_debug", tasks=(MISSING_TASK,), verbosity="DEBUG")
    assert proc.returncode != 0 and results_files(task_setup, "failed_debug") == []
    assert "no-such-data.jsonl" in proc.stdout + proc.stderr


@pytest.mark.parametrize("lmms_model,family", [("fitprune_llava_next_hf", "next"), ("fitprune_qwen2_5_vl", "qwen")])
def test_lmms_eval_runs_the_other_families_pruned(task_setup, lmms_model, family):
    """LLaVA-NeXT (anyres) and Qwen2.5-VL (dynamic resolution, M-RoPE) through the same task: each sample's
    visual-token count gets the recipe scaled to it (`Recipe.drops_for`)."""
    from llava_fitprune.adapters.hf.tiny import TinyVlmSpec, build_tiny_llava_hf as build_llava, build_tiny_qwen2_5_vl

    spec = TinyVlmSpec()
    checkpoint = task_setup["root"] / f"tiny-{family}"
    if family == "next":
        build_llava(str(checkpoint), spec, next_anyres=True)
    else:
        build_tiny_qwen2_5_vl(str(checkpoint), spec)
    recipe = Recipe([4] * (spec.num_layers - 1) + [0], num_visual_tokens=64)
    path = task_setup["root"] / f"recipe_{family}.json"
    recipe.save(path)
    result, logged, _ = run_lmms_eval({**task_setup, "checkpoint": checkpoint}, f"pruned_{family}",
                                      model_args=f",recipe={path}", lmms_model=lmms_model)
    assert 0.0 <= result["results"][TASK]["exact_match,none"] <= 1.0 and len(logged) == len(task_setup["docs"])
    for sample in logged:
        record = sample["token_counts"][0]["fitprune"]
        kept = record["visual_tokens"] - sum(recipe.drops_for(record["visual_tokens"]))
        assert (record["recipe"], record["visual_tokens_kept"]) == (recipe.fingerprint(), kept)
        assert record["prefill_tflops"] < record["dense_prefill_tflops"]


@pytest.mark.skipif(not SLOW, reason="the accelerate test below launches through torch.distributed.run too: "
                                     "LLAVA_FITPRUNE_SLOW=1")
def test_lmms_eval_data_parallel_two_processes(task_setup):
    """Two processes, as `accelerate launch --num_processes 2` starts them on GPUs (torch.distributed.run,
    one rank each), called directly with ACCELERATE_USE_CPU (gloo). Each rank answers its shard; rank 0
    logs all samples and the score."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result, logged, output = run_lmms_eval(task_setup, "parallel", launcher=launcher, batch_size=2,
                                           env={"ACCELERATE_USE_CPU": "true"})
    assert "data parallel: process 0 of 2" in output and "data parallel: process 1 of 2" in output
    check_logged(task_setup, result, logged)


def test_lmms_eval_accelerate_launch_two_processes(task_setup):
    """The README's line, `accelerate launch --num_processes N -m lmms_eval ...`, in .venv-hf: accelerate's
    command line imports timm when it is installed, and timm needs torchvision, which setup.sh --hf removes
    (with timm). On GPUs accelerate adds --multi_gpu itself when it sees more than one (on CPU it would run
    one process): here it is given, with ACCELERATE_USE_CPU (gloo), and accelerate starts the two ranks
    through torch.distributed.run. Each rank answers its shard; rank 0 logs the same samples and score."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534"]
    result, logged, output = run_lmms_eval(task_setup, "accelerate", launcher=launcher, entry=["-m", "lmms_eval"],
                                           env={"ACCELERATE_USE_CPU": "true"})
    assert "data parallel: process 0 of 2" in output and "data parallel: process 1 of 2" in output
    check_logged(task_setup, result, logged)
