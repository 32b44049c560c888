"""The compiled prefill (fast_prefill.py): no graph break in the layer loop, the same drops at every
layer and the same logits as the eager loop, batched and one by one; one compilation for every
prompt length. aot_eager keeps the tests' compile times small; inductor runs in the benchmark
(BENCHMARKS.md). FitPrune runs by default; every other method (a graph each, about a minute
each on a loaded 2-core machine) with LLAVA_FITPRUNE_SLOW=1."""
import os

import pytest
import torch

from llava_fitprune import OracleSelector, Recipe
from llava_fitprune.adapters.llava.cache import PrunedCache
from llava_fitprune.adapters.llava.fast_prefill import compile_prefill, prefill_compile_stats
from llava_fitprune.bench.models import PromptLayout, build_lm, load_lm_config, make_inputs
from llava_fitprune.core.selectors import FastVSelector, FitPruneSelector, RandomSelector, UniformSelector

LAYERS, VISUAL = 3, 48
RECIPES = {  # the method's schedule on the tiny model (counts of 48 visual tokens)
    "fitprune": Recipe([6, 0, 10], VISUAL), "uniform": Recipe([5, 5, 5], VISUAL),
    "random": Recipe([6, 0, 10], VISUAL), "fastv": Recipe([0, 24, 0], VISUAL),
}
SLOW = os.environ.get("LLAVA_FITPRUNE_SLOW") == "1"
SELECTORS = {"fitprune": FitPruneSelector, "uniform": UniformSelector, "random": lambda: RandomSelector(seed=3),
             "fastv": FastVSelector}


def _lm():
    cfg, _ = load_lm_config("llava-v1.5-7b", width=64, heads=2)
    cfg["num_hidden_layers"] = LAYERS
    return build_lm("llava-v1.5-7b", cfg, False, "sdpa", torch.float32, "cpu")


@pytest.fixture(scope="module")
def models():
    """(eager, compiled) models with the same weights."""
    torch._dynamo.reset()
    eager, compiled = _lm(), _lm()
    compiled.load_state_dict(eager.state_dict())
    compile_prefill(compiled, backend="aot_eager")
    return eager, compiled


def _batch(lm, text_tokens, seed):
    """Samples with text_tokens[b] tokens after the image, left-padded into one batch:
    (embeds [B, N, D], visual [B, N], attention_mask [B, N])."""
    parts = [make_inputs(lm, PromptLayout(5, VISUAL, t), 1, seed=seed + i) for i, t in enumerate(text_tokens)]
    n = max(e.shape[1] for e, _ in parts)
    embeds = torch.zeros(len(parts), n, parts[0][0].shape[-1])
    visual = torch.zeros(len(parts), n, dtype=torch.bool)
    mask = torch.zeros(len(parts), n, dtype=torch.long)
    for b, (e, v) in enumerate(parts):
        embeds[b, n - e.shape[1]:], visual[b, n - e.shape[1]:], mask[b, n - e.shape[1]:] = e[0], v[0], 1
    return embeds, visual, mask


def _run(lm, embeds, visual, mask, selector):
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, visual_mask=visual, attention_mask=mask, selector=selector, use_cache=True)
    trace = lm.get_model().last_trace
    drops = [None if d is None else d.tolist() for d in trace.dropped_positions]
    return out.logits[trace.final_valid], drops, out.past_key_values  # real rows: [n, V]


def _same(eager, compiled, embeds, visual, mask, selector):
    logits_e, drops_e, cache_e = _run(eager, embeds, visual, mask, selector)
    logits_c, drops_c, cache_c = _run(compiled, embeds, visual, mask, selector)
    assert drops_c == drops_e
    assert any(d is not None for d in drops_e)
    assert cache_c.layer_lengths() == cache_e.layer_lengths()
    torch.testing.assert_close(logits_c, logits_e, atol=1e-5, rtol=0)
    return drops_e


@pytest.mark.parametrize("method", ["fitprune"] + [
    pytest.param(m, marks=pytest.mark.skipif(not SLOW, reason="a compilation each: LLAVA_FITPRUNE_SLOW=1"))
    for m in ("uniform", "random", "fastv", "oracle")])
def test_compiled_prefill_equals_eager(models, method):
    eager, compiled = models
    stats = prefill_compile_stats(compiled)
    before = stats.compiling_calls
    replay = None
    if method == "oracle":  # replays FitPrune's drops
        recipe, selector = RECIPES["fitprune"], FitPruneSelector()
    else:
        recipe, selector = RECIPES[method], SELECTORS[method]()
    for lm in models:
        lm.set_pruning(recipe, selector)
    texts = [7, 3, 11]
    embeds, visual, mask = _batch(eager, texts, seed=1)
    if method == "oracle":
        _, drops, _ = _run(eager, embeds, visual, mask, None)
        replay = OracleSelector([None if d is None else torch.tensor(d) for d in drops])
    with torch._dynamo.config.patch(recompile_limit=64):
        _same(eager, compiled, embeds, visual, mask, replay)  # batched, left-padded
        for b, t in enumerate(texts):  # one by one
            if b == 1:
                graphs = _graphs()
            one = _batch(eager, [t], seed=1 + b)
            single = None
            if method == "oracle":
                _, drops, _ = _run(eager, *one, None)
                single = OracleSelector([None if d is None else torch.tensor(d) for d in drops])
            _same(eager, compiled, *one, single)
    # graphs are made for the padded batch and for batch 1 (none when an earlier method made the
    # same kinds of step): the first batch-1 length serves the other two
    assert stats.compiling_calls - before <= 2 and _graphs() == graphs, stats


def test_layer_loop_has_no_graph_break():
    """torch._dynamo.explain of the eager loop on a FitPrune prefill's arguments: one graph."""
    import dataclasses

    lm = _lm()
    lm.set_pruning(RECIPES["fitprune"], FitPruneSelector())
    model = lm.get_model()
    captured = {}
    loop = model.decoder_layers

    def grab(*args):
        captured["args"] = list(args)
        captured["args"][6] = dataclasses.replace(args[6])  # the state, before the loop changes it
        return loop(*args)

    model.decoder_layers = grab
    embeds, visual, mask = _batch(lm, [6], seed=0)
    with torch.no_grad():
        lm(inputs_embeds=embeds, visual_mask=visual, use_cache=True)
        del model.decoder_layers
        args = captured["args"]
        args[3] = PrunedCache()
        explained = torch._dynamo.explain(loop)(*args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_one_graph_per_layer_kind_and_switching_ratio_recipe_or_method_compiles_nothing_new(models):
    """Regional compilation: a FitPrune prefill makes one graph per kind of layer step (stock, and
    the pruning step with its selection), not one per layer; another recipe (other counts at other
    layers), uniform, another FastV schedule or the oracle make none; FastV two (its pruning attention
    step, which returns the probabilities, and the output step: the selection runs between them),
    random one (its attention step returns no scores). Every call still equals the eager loop."""
    eager, compiled = models
    torch._dynamo.reset()
    one = _batch(eager, [7], seed=5)  # batch 1, no padding
    fitprune_drops = None
    made = {}
    cases = [("fitprune", RECIPES["fitprune"], FitPruneSelector()), ("other recipe", Recipe([0, 12, 4], VISUAL),
             FitPruneSelector()), ("uniform", RECIPES["uniform"], UniformSelector()),
             ("fastv", RECIPES["fastv"], FastVSelector()), ("fastv later", Recipe([0, 0, 30], VISUAL), FastVSelector()),
             ("random", RECIPES["random"], RandomSelector(seed=3)), ("oracle", RECIPES["fitprune"], None)]
    for name, recipe, selector in cases:
        for lm in models:
            lm.set_pruning(recipe, selector or FitPruneSelector())
        replay = None if selector is not None else OracleSelector([None if d is None else torch.tensor(d)
                                                                   for d in fitprune_drops])
        before = _graphs()
        drops = _same(eager, compiled, *one, replay)
        made[name] = _graphs() - before
        if name == "fitprune":
            fitprune_drops = drops
    assert made == {"fitprune": 2, "other recipe": 0, "uniform": 0, "fastv": 2, "fastv later": 0, "random": 1,
                    "oracle": 0}, made


def test_a_failing_compile_falls_back_to_the_eager_step_with_one_warning():
    """A compiler that raises (as inductor does on a truncated cache entry): the prefill still runs,
    with the eager loop's results, after one warning; later prefills run eagerly without another."""
    import warnings

    def broken(gm, example_inputs):
        raise RuntimeError("planted compiler failure")

    eager, compiled = _lm(), _lm()
    compiled.load_state_dict(eager.state_dict())
    loop = compile_prefill(compiled, backend=broken)
    for lm in (eager, compiled):
        lm.set_pruning(RECIPES["fitprune"], FitPruneSelector())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (1, 2):
            _same(eager, compiled, *_batch(eager, [5], seed=seed), None)
    messages = [str(w.message) for w in caught if "compiled prefill failed" in str(w.message)]
    assert len(messages) == 1 and "planted compiler failure" in messages[0], messages
    assert len(loop.stats.eager_regions) == 1 and loop.stats.calls == 2


def test_first_compile_lock_serialises_processes_sharing_the_cache(tmp_path, monkeypatch):
    """Eval chunks share inductor's cache: the first compiled prefill of each holds a file lock there,
    so the second waits for the first (then loads its graphs) instead of compiling at the same time."""
    import threading

    from llava_fitprune.adapters.llava.fast_prefill import _first_compile_lock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    order, first_in = [], threading.Event()

    def first():
        with _first_compile_lock(True):
            first_in.set()
            order.append("first in")
            threading.Event().wait(0.5)
            order.append("first out")

    def second():
        first_in.wait()
        with _first_compile_lock(True):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == ["first in", "first out", "second in"], order
    assert (tmp_path / "llava_fitprune-prefill.lock").exists()


_CHILD = r"""
import json, sys, warnings
import torch
torch.set_num_threads(1)
from tests.test_fast_prefill import _lm
from llava_fitprune import Recipe
from llava_fitprune.adapters.llava.fast_prefill import compile_prefill
torch.manual_seed(0)
eager, compiled = _lm(), _lm()
compiled.load_state_dict(eager.state_dict())
loop = compile_prefill(compiled, backend="inductor")
embeds = torch.randn(1, 12, eager.config.hidden_size)
with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = eager(inputs_embeds=embeds, use_cache=True).logits
    b = compiled(inputs_embeds=embeds, use_cache=True).logits
print(json.dumps({"diff": float((a - b).abs().max()), "graphs": loop.stats.graphs, "calls": loop.stats.calls,
                  "warnings": [str(w.message) for w in caught if "compiled prefill failed" in str(w.message)]}))
"""


@pytest.mark.skipif(not SLOW, reason="two inductor compilations in subprocesses (minutes): LLAVA_FITPRUNE_SLOW=1")
def test_a_truncated_inductor_cache_entry_falls_back_to_eager(tmp_path):
    """Planted corruption: a first process compiles the stock layer step with inductor into an empty
    cache; every compiled library there is then truncated (as a killed compile leaves it); a second
    process sharing that cache still answers, equal to the eager loop, after one warning."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def child():
        done = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=root, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = child()
    assert first["diff"] < 1e-5 and first["graphs"] == 1 and not first["warnings"], first
    libraries = list((tmp_path / "cache").rglob("*.so"))
    assert libraries
    for lib in libraries:
        lib.write_bytes(lib.read_bytes()[:64])
    second = child()
    assert second["diff"] < 1e-5 and second["calls"] == 1, second
    assert len(second["warnings"]) == 1, second
