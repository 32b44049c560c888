"""`llava-fitprune bench` on a tiny 32-layer config: outputs, KV bytes vs the FLOPs model, oracle replay.

No timing assertions: timings on a shared CPU say nothing in a unit test.
"""
import csv
import os

import pytest
import torch

from llava_fitprune import OracleSelector, builtin_recipe
from llava_fitprune.cli.bench import main as bench_main
from llava_fitprune.bench.models import PromptLayout, build_lm, load_lm_config, make_inputs
from llava_fitprune.bench.report import COLUMNS
from llava_fitprune.core.flops import LMShape, kv_cache_bytes, tokens_entering
from llava_fitprune.adapters.llava.layer_step import attention_mask_4d, attention_rows, attention_rows_head_max

TINY = ["--model", "llava-v1.5-7b", "--width", "64", "--heads", "2"]  # 32 layers, as the built-in recipes
LAYOUT = PromptLayout(prompt_tokens=4, visual_tokens=48, text_tokens=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for this module


@pytest.fixture(scope="module")
def tiny_lm(one_thread):
    cfg, has_weights = load_lm_config("llava-v1.5-7b", width=64, heads=2)
    return cfg, build_lm("llava-v1.5-7b", cfg, has_weights, "sdpa", torch.float32, "cpu")


def test_bench_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "bench"
    argv = TINY + ["--prompt-tokens", "4", "--visual-tokens", "48", "--text-tokens", "3",
                   "--reduction-ratio", "0.6", "--attn", "eager", "sdpa", "--batch-size", "2", "--compile",
                   "--warmup", "0", "--repeats", "1", "--new-tokens", "2", "3", "--threads", "1", "--out-dir", str(out),
                   "--tag", "t"]
    assert bench_main(argv) == 0
    with open(out / "t.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    per_group = 3 + 5  # stock, dense, dense-fast, then fitprune(-fast) / oracle(-fast) / prellm for the ratio
    assert len(rows) == 2 * per_group  # two attention implementations
    assert {r["method"] for r in rows} == {"stock", "dense", "dense-fast", "fitprune", "fitprune-fast", "oracle",
                                           "oracle-fast", "prellm"}
    for r in rows:
        assert all(r[c] != "" for c in COLUMNS), r
        assert int(r["kv_bytes"]) == int(r["kv_bytes_predicted"])  # measured cache == FLOPs model
        if r["method"] in ("fitprune", "oracle"):
            assert float(r["flops_reduction"]) > 0
        if r["method"].startswith("oracle"):
            assert float(r["time_vs_oracle"]) == 1.0  # against the oracle on its own path
        assert (int(r["short_new_tokens"]), int(r["new_tokens"])) == (2, 3)
        assert float(r["e2e_short_ms"]) <= float(r["e2e_ms"])
    assert os.path.getsize(out / "t.png") > 0
    assert "| fitprune |" in (out / "t.md").read_text()


def test_cpu_proxy_runs_every_row(tmp_path):
    """The host-bound CPU proxy of BENCHMARKS.md (32 layers, width 128, the real 35 + 576 + 30
    prompt) with every row, as CI runs it; timings are recorded, not asserted."""
    argv = ["--model", "llava-v1.5-7b", "--width", "128", "--reduction-ratio", "0.6", "--attn", "sdpa",
            "--batch-size", "1", "--compile", "--warmup", "0", "--repeats", "1", "--new-tokens", "2", "--threads", "1",
            "--out-dir", str(tmp_path), "--tag", "proxy"]
    assert bench_main(argv) == 0
    with open(tmp_path / "proxy.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"stock", "dense", "dense-fast", "fitprune", "fitprune-fast", "oracle", "oracle-fast", "prellm"}
    assert rows["fitprune-fast"]["kv_bytes"] == rows["fitprune"]["kv_bytes"] < rows["dense-fast"]["kv_bytes"]
    for method in ("stock", "dense-fast"):
        assert int(rows[method]["kv_bytes"]) == int(rows["dense"]["kv_bytes"])


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_kv_cache_bytes_equal_the_flops_model(tiny_lm, ratio):
    cfg, lm = tiny_lm
    recipe = builtin_recipe(ratio)
    x, visual = make_inputs(lm, LAYOUT, batch=2)
    lm.set_pruning(recipe)
    cache = lm(inputs_embeds=x, visual_mask=visual, use_cache=True).past_key_values
    lm.set_pruning(None)
    schedule = tokens_entering(LAYOUT.total, recipe.drops_for(LAYOUT.visual_tokens))
    assert cache.layer_lengths() == schedule[:-1]
    assert cache.nbytes() == kv_cache_bytes(LMShape.from_config(cfg), schedule[:-1], bytes_per_element=4, batch=2)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.6, 0.9])
def test_oracle_with_trace_positions_reproduces_fitprune(tiny_lm, ratio):
    """Drop by index: replaying FitPrune's dropped positions gives FitPrune's logits and cache."""
    _, lm = tiny_lm
    x, visual = make_inputs(lm, LAYOUT, batch=2, seed=1)
    lm.set_pruning(builtin_recipe(ratio))
    fit = lm(inputs_embeds=x, visual_mask=visual, use_cache=True)
    trace = lm.get_model().last_trace
    dropped = trace.dropped_positions
    lm.set_pruning(None)
    oracle = lm(inputs_embeds=x, visual_mask=visual, use_cache=True, selector=OracleSelector(dropped))
    replay = lm.get_model().last_trace
    assert torch.equal(replay.final_positions, trace.final_positions)
    for a, b in zip(dropped, replay.dropped_positions):
        assert (a is None and b is None) or torch.equal(a, b)
    assert fit.past_key_values.layer_lengths() == oracle.past_key_values.layer_lengths()
    torch.testing.assert_close(oracle.logits, fit.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_blocked_head_max_attention_equals_full_probabilities(monkeypatch, padded):
    """The pruning layer's block-by-block attention (several blocks here) matches the one-piece one."""
    import llava_fitprune.adapters.llava.layer_step as ls

    monkeypatch.setattr(ls, "BLOCK_ELEMENTS_DEFAULT", 1)  # minimum-size blocks
    gen = torch.Generator().manual_seed(0)
    B, H, N, hd, r0 = 3, 2, 50, 8, 7
    q, k, v = (torch.randn(B, N, H, hd, generator=gen).transpose(1, 2) for _ in range(3))  # [B, H, N, hd]
    mask = None
    if padded:
        key_mask = torch.ones(B, N, dtype=torch.bool)
        key_mask[1, :5] = False  # left padding
        mask = attention_mask_4d(key_mask, N, 0, q.dtype, "eager", True)
    out_full, probs = attention_rows(q, k, v, r0, mask)
    out = torch.zeros(B, H, N, hd)
    head_max = attention_rows_head_max(q, k, v, r0, mask, out)
    torch.testing.assert_close(out[:, :, r0:], out_full)
    torch.testing.assert_close(head_max, probs.amax(1))
