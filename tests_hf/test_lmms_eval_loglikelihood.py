"""The plugin's `loglikelihood` (lmms-eval's multiple-choice tasks), pruned and not, on tiny llava-hf,
LLaVA-NeXT and Qwen2.5-VL checkpoints (dense: `test_lmms_eval_plugin_args.py`). It returns the continuation's
mean token loss (lmms-eval's convention, see `FitPruneHF.loglikelihood`) and whether it is greedy:
- a zero recipe gives the stock model's one-forward log-probabilities and greedy flags;
- every schedule (zero, pruning) gives what the pruned model's own cached decoding gives: the raw
  logits `generate` emits (adapters.hf `load_pretrained` + `generate`, one token a step) with the
  continuation forced token by token, whether or not the continuation is the greedy one."""
from __future__ import annotations

import math

import pytest
import torch
from lmms_eval.api.instance import Instance
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import image, load_ours, load_stock
from llava_fitprune.core.recipe import Recipe
from llava_fitprune.lmms_eval_plugin.model import FitPruneLlavaHF, FitPruneLlavaNextHF, FitPruneQwen2_5_VL

PLUGIN = {"llava": FitPruneLlavaHF, "next": FitPruneLlavaNextHF, "qwen": FitPruneQwen2_5_VL}
QUESTION = "what is the colour of the shape ?"
PICTURE = image(3, (100, 150))
WORDS = ["red", "circle", "two", "yes", "blue", "star"]


class ForceTokens(LogitsProcessor):
    """Greedy decoding made to emit `targets` ([C] ids) from prompt length `start` on."""

    def __init__(self, targets: torch.Tensor, start: int):
        self.targets, self.start = targets, start

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.targets[input_ids.shape[1] - self.start]] = 0.0
        return forced


def schedule(kind: str, tmp_path) -> dict:
    """--model_args of one schedule: a zero recipe, or drops at three of the four layers."""
    drops = [0, 0, 0, 0] if kind == "zero" else [16, 16, 16, 0]
    path = tmp_path / f"{kind}.json"
    Recipe(drops, num_visual_tokens=64).save(path)
    return {"recipe": str(path)}


def requests(lm, continuations):
    lm.task_dict = {"t": {"test": [{"question": QUESTION}]}}
    return [Instance("loglikelihood", (QUESTION, c, lambda doc: [PICTURE], 0, "t", "test"), idx=i,
                     metadata={"task": "t", "doc_id": 0, "repeats": 1}) for i, c in enumerate(continuations)]


def forced_decoding(model, inputs, targets):
    """(mean token loss, greedy) of `targets` [C] after `inputs`, from generate's raw per-step logits."""
    start = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=len(targets), do_sample=False, return_dict_in_generate=True,
                             output_logits=True, logits_processor=LogitsProcessorList([ForceTokens(targets, start)]))
    assert out.sequences[0, start:].tolist() == targets.tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)  # [C, vocab]
    return -float(logprobs.gather(-1, targets[:, None]).mean()), bool((logprobs.argmax(-1) == targets).all())


def one_forward(model, inputs, full_ids):
    """The stock model's one forward over prompt + continuation: (mean token loss, greedy)."""
    n = inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": full_ids, "attention_mask": torch.ones_like(full_ids)}
    if "mm_token_type_ids" in inputs:  # Qwen: the continuation is text
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                               torch.zeros_like(full_ids[:, n:])], 1)
    with torch.no_grad():
        logits = model(**full).logits[:, n - 1:-1]  # [1, C, vocab]
    logprobs = torch.log_softmax(logits.float(), -1)
    targets = full_ids[:, n:]
    return -float(logprobs.gather(-1, targets[..., None]).mean()), bool((logprobs.argmax(-1) == targets).all())


@pytest.mark.parametrize("family,kind", [("llava", "zero"), ("llava", "pruning"), ("next", "pruning"),
                                         ("qwen", "pruning")])
def test_loglikelihood_equals_the_models_own_decoding(tiny_paths, tmp_path, family, kind):
    path = tiny_paths[family]
    model_args = schedule(kind, tmp_path)
    lm = PLUGIN[family](pretrained=path, device="cpu", **model_args)
    inputs = lm._inputs([lm._prompt(QUESTION, 1)], [PICTURE])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():  # the greedy continuation of this (pruned) model
        greedy = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, n:]
    record = lm.model.fitprune_last  # generate's prefill
    if kind == "pruning":
        assert record.visual_tokens_kept[0] < record.visual_tokens[0]  # the prefill dropped tokens
    else:
        assert record.visual_tokens_kept == record.visual_tokens
    texts = [" " + lm.tokenizer.decode(greedy), " " + " ".join(WORDS[:2]), " " + " ".join(WORDS[2:5])]
    out = lm.loglikelihood(requests(lm, texts))
    results = [r.text for r in out]  # (loss, greedy) each
    assert [r.token_counts.fitprune["visual_tokens_kept"] for r in out] == record.visual_tokens_kept * len(texts)
    ours, _ = load_ours(path, **model_args)  # the direct API, apart from the plugin's model
    stock = load_stock(path)
    assert results[0][1] is True  # the greedy continuation is reported greedy
    for text, (loss, greedy_flag) in zip(texts, results):
        full_ids = lm._inputs([lm._prompt(QUESTION, 1) + text], [PICTURE])["input_ids"]
        targets = full_ids[0, n:]
        assert len(targets) >= 1 and math.isfinite(loss) and loss > 0
        expected, expected_greedy = forced_decoding(ours, inputs, targets)
        assert loss == pytest.approx(expected, abs=1e-5) and greedy_flag == expected_greedy
        reference, reference_greedy = one_forward(stock, inputs, full_ids)
        if kind == "pruning":  # the drops change the scores
            assert abs(loss - reference) > 1e-3
        else:  # no drop: the stock model's one forward
            assert loss == pytest.approx(reference, abs=1e-5) and greedy_flag == reference_greedy
