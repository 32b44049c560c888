"""The transformers backend's compiled prefill (adapters/hf/fast_prefill.py) against its eager path, on
tiny llava-hf, LLaVA-NeXT and Qwen2.5-VL (fp32 CPU): same kept tokens at every layer, same greedy tokens,
logits within 1e-5; graphs made once for every layer, ratio and method; a failing compiler falls back.
Default backend aot_eager (fast); LLAVA_FITPRUNE_SLOW=1 runs inductor."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from conftest import MODELS, generate, kept_after_layers, load_ours, make_inputs
from llava_fitprune.adapters.hf import disable_fast_path, enable_fast_path
from llava_fitprune.core.recipe import Recipe

RECIPE = Recipe([10, 20, 5, 0], num_visual_tokens=64)  # drops at layer 0 and in the middle, none at the last
OTHER = Recipe([3, 0, 30, 12], num_visual_tokens=64)  # other layers, other counts
NEW = 3
BACKEND = "inductor" if os.environ.get("LLAVA_FITPRUNE_SLOW") == "1" else "aot_eager"


def _run(model, inputs):
    """(new tokens [B, NEW], logits [B, NEW, V], kept original positions per sample per layer or None)"""
    tokens, logits = generate(model, inputs, NEW)
    trace, N = model.fitprune_trace, inputs["input_ids"].shape[1]
    kept = None if trace is None else [kept_after_layers(trace, N, sample=b) for b in range(tokens.shape[0])]
    return tokens, logits, kept


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


COMPILED = ("llava", "next", "qwen")  # the families whose layers the compiled regions cover (COMPILED_MODEL_TYPES)


@pytest.mark.parametrize("name", [m for m in MODELS if m not in COMPILED])
def test_other_families_refuse_the_compiled_prefill_in_one_line(tiny_paths, name):
    """Families the regions do not cover (DeepStack, other text models) are refused, never compiled wrong."""
    model, _ = load_ours(tiny_paths[name])
    with pytest.raises(NotImplementedError, match="runs eagerly") as refused:
        enable_fast_path(model, backend=BACKEND)
    assert "\n" not in str(refused.value)


@torch.no_grad()
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_prefill_equals_eager(tiny_paths, name):
    """FitPrune and dense on a padded batch of two (llava: also one prompt alone, batch-1 graphs): the
    compiled prefill keeps the eager path's tokens at every layer and generates its tokens, logits within 1e-5."""
    model, processor = load_ours(tiny_paths[name])
    cases = [(RECIPE, make_inputs(processor, [0, 1])), (None, make_inputs(processor, [0, 1]))]
    if name == "llava":
        cases.append((RECIPE, make_inputs(processor, [1])))
    eager = []
    for recipe, inputs in cases:
        model.set_pruning(recipe)
        eager.append(_run(model, inputs))
    stats = enable_fast_path(model, backend=BACKEND)
    for (recipe, inputs), (tokens, logits, kept) in zip(cases, eager):
        model.set_pruning(recipe)
        calls = stats.calls
        c_tokens, c_logits, c_kept = _run(model, inputs)
        assert stats.calls == calls + 1, "the prefill did not run the compiled regions"
        assert c_kept == kept
        assert torch.equal(c_tokens, tokens)
        torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=0)
    assert stats.eager_regions == []  # (graphs made by another model of the same shapes are reused: maybe none here)
    pruned_kept = eager[0][2][0]  # sample 0 of the pruned batch: tokens did drop
    assert len(pruned_kept[-1]) < len(pruned_kept[0])


@torch.no_grad()
def test_switching_ratio_method_and_length_compiles_nothing_new(tiny_paths):
    """FitPrune compiles 2 graphs (stock, and the pruning step with its selection) for all layers; another
    recipe, uniform and another prompt length reuse them; fastv adds its attention graph (probabilities)
    and the output graph (its selection runs between them), random its attention graph without scores;
    going back compiles nothing."""
    torch._dynamo.reset()
    model, processor = load_ours(tiny_paths["llava"], recipe=RECIPE)
    stats = enable_fast_path(model, backend=BACKEND)
    short, long_ = make_inputs(processor, [0]), make_inputs(processor, [1])
    assert short["input_ids"].shape[1] != long_["input_ids"].shape[1]
    start = _graphs()
    generate(model, short, 1)
    assert _graphs() - start == 2 == stats.graphs
    for kw, new in ((dict(recipe=OTHER), 0), (dict(method="uniform", per_layer=5, num_visual_tokens=64), 0),
                    (dict(method="fastv", num_visual_tokens=64), 2), (dict(recipe=RECIPE, method="random"), 1),
                    (dict(recipe=RECIPE), 0)):
        model.set_pruning(**kw)
        for inputs in (short, long_):
            before = _graphs()
            generate(model, inputs, 1)
            assert model.fitprune_last.visual_tokens_kept[0] < model.fitprune_last.visual_tokens[0]
            assert _graphs() - before == (new if inputs is short else 0), kw
    assert stats.eager_regions == []


@torch.no_grad()
def test_failing_compiler_falls_back_to_eager_with_one_warning(tiny_paths):
    """A backend that raises (at the first region: layer 0 prunes): one RuntimeWarning, then every region
    runs eagerly; the answer is the eager one."""
    def broken(gm, example_inputs):
        raise RuntimeError("planted compiler failure")

    model, processor = load_ours(tiny_paths["llava"], recipe=RECIPE)
    inputs = make_inputs(processor, [0])
    tokens, logits, kept = _run(model, inputs)
    stats = enable_fast_path(model, backend=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c_tokens, c_logits, c_kept = _run(model, inputs)
        _run(model, inputs)
    ours = [w for w in caught if "compiled prefill failed" in str(w.message)]
    assert len(ours) == 1 and "planted compiler failure" in str(ours[0].message)
    assert stats.eager_regions == ["pruning_step"] and stats.calls == 2
    assert c_kept == kept and torch.equal(c_tokens, tokens)
    torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=0)
    disable_fast_path(model)
    assert model.fitprune_compile_stats is None


def test_compile_is_checked_before_the_weights(tiny_paths):
    with pytest.raises(ValueError, match="compile='yes'"):
        load_ours(tiny_paths["llava"], compile="yes")
