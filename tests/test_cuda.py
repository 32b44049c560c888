"""The core guarantees again on a CUDA device, in the dtypes people run there (skipped without CUDA).

The CPU suite checks them in float32. Here: a zero recipe gives the stock model's logits in
float16 / bfloat16 with eager and SDPA kernels; CUDA float32 drops the same tokens as CPU float32;
batched equals one-by-one and cached decoding equals recomputation on CUDA; and at the real
LLaVA-1.5-7B shape (random weights, bfloat16) the pruning model with a zero recipe equals
transformers' own `LlamaForCausalLM` and its cache equals recomputation.
Run on a GPU machine: `python -m pytest -q tests/test_cuda.py` (results: BENCHMARKS.md, "GPU").
"""

import pytest
import torch

from llava_fitprune import OracleSelector, Recipe, zero_recipe
from .conftest import batch_ids, image_tensor, load_ours, load_stock, prompt_ids
from .test_equivalence import QUESTIONS, RECIPE4, _gen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def no_tf32():
    """CUDA float32 must mean float32: TF32 convolutions (the CLIP patch embedding) would not match CPU."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_zero_recipe_equals_stock_half(tiny_dir, dtype, attn):
    stock = load_stock(tiny_dir, attn, "cuda", HALF[dtype])
    tok, model, _, _ = load_ours(tiny_dir, attn, "cuda", torch_dtype=HALF[dtype])
    model.set_pruning(zero_recipe(4, 576))
    ids, images = prompt_ids(tok, QUESTIONS[0])[None].cuda(), image_tensor(1, 336).to("cuda", HALF[dtype])
    torch.testing.assert_close(model(ids, images=images).logits, stock(ids, images=images).logits, atol=0, rtol=0)
    a = stock.generate(ids, images=images, max_new_tokens=8, do_sample=False)
    b = model.generate(ids, images=images, max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cuda_float32_drops_what_cpu_drops(tiny_dir, attn):
    out = {}
    for device in ("cpu", "cuda"):
        tok, model, _, _ = load_ours(tiny_dir, attn, device, torch_dtype=torch.float32, recipe=RECIPE4)
        ids, images = prompt_ids(tok, QUESTIONS[2])[None].to(device), image_tensor(2, 336).to(device)
        logits = model(ids, images=images).logits.cpu()
        out[device] = logits, [d if d is None else d.cpu().tolist() for d in model.last_trace.dropped_positions]
    assert out["cuda"][1] == out["cpu"][1]
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_equals_one_by_one_cuda(tiny_dir, attn):
    tok, model, _, _ = load_ours(tiny_dir, attn, "cuda", torch_dtype=torch.float32, recipe=RECIPE4)
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))]).cuda()
    ids, mask = batch_ids(tok, QUESTIONS)
    seq_b, scores_b, _ = _gen(model, ids.cuda(), images, attention_mask=mask.cuda())
    for i, q in enumerate(QUESTIONS):
        seq_1, scores_1, _ = _gen(model, prompt_ids(tok, q)[None].cuda(), images[i:i + 1])
        assert seq_b[i].tolist() == seq_1[0].tolist(), f"sample {i}"
        torch.testing.assert_close(scores_b[i], scores_1[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_decoding_equals_recompute_cuda(tiny_dir, dtype):
    torch_dtype = {"float32": torch.float32, **HALF}[dtype]
    tol = 1e-4 if dtype == "float32" else 2e-2
    tok, model, _, _ = load_ours(tiny_dir, "sdpa", "cuda", torch_dtype=torch_dtype, recipe=RECIPE4)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None].cuda(), image_tensor(3, 336).to("cuda", torch_dtype)
    seq, scores, _ = _gen(model, ids, images, n=6)
    oracle = OracleSelector(model.last_trace.dropped_positions)
    logits = model(torch.cat([ids, seq[:, :-1]], 1), images=images, selector=oracle, use_cache=False).logits
    recomputed = logits[:, -seq.shape[1]:].float()
    assert recomputed.argmax(-1).tolist() == seq.tolist()
    torch.testing.assert_close(recomputed, scores.float(), atol=tol, rtol=tol)


# --- the real LLaVA-1.5-7B language model shape, random weights, bfloat16 ---------------------------

def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2 ** 30 if torch.cuda.is_available() else 0.0


@pytest.fixture(scope="module")
def lm7b():
    from llava_fitprune.bench.models import PromptLayout, build_lm, load_lm_config, make_inputs

    if _free_gib() < 40:
        pytest.skip("the 7B shape needs about 30 GiB of free GPU memory (two bf16 copies)")
    cfg, _ = load_lm_config("llava-v1.5-7b")
    lm = build_lm("llava-v1.5-7b", cfg, False, "sdpa", torch.bfloat16, "cuda")
    embeds, visual = make_inputs(lm, PromptLayout(35, 576, 30), batch=2)
    return cfg, lm, embeds, visual


@torch.no_grad()
def test_7b_zero_recipe_equals_transformers_llama(lm7b):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, lm, embeds, visual = lm7b
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as build_lm: the rotary cos/sin caches in bfloat16 too
    try:
        with torch.device("cuda"):
            stock = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    stock.load_state_dict(lm.state_dict())
    stock.eval()
    lm.set_pruning(zero_recipe(cfg["num_hidden_layers"], 576))
    ours = lm(inputs_embeds=embeds, visual_mask=visual).logits
    torch.testing.assert_close(ours, stock(inputs_embeds=embeds).logits, atol=0, rtol=0)


def _step_vs_recompute(lm, embeds, visual, selector=None):
    """(max |cached step - recomputed| over the next token's logits, argmaxes agree, dropped positions)."""
    out = lm(inputs_embeds=embeds, visual_mask=visual, use_cache=True)
    dropped = lm.last_trace.dropped_positions
    new = lm.get_model().embed_tokens(out.logits[:, -1:].argmax(-1))  # [B, 1, D]
    step = lm(inputs_embeds=new, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]  # [B, V]
    mask = torch.cat([visual, torch.zeros_like(visual[:, :1])], 1)
    replay = OracleSelector(dropped) if any(d is not None for d in dropped) else None
    again = lm(inputs_embeds=torch.cat([embeds, new], 1), visual_mask=mask, selector=replay,
               use_cache=False).logits[:, -1]
    agree = step.argmax(-1).tolist() == again.argmax(-1).tolist()
    return (step.float() - again.float()).abs().max().item(), agree, dropped


@torch.no_grad()
def test_7b_pruned_cache_equals_recompute_and_batch(lm7b):
    """bfloat16 over 32 layers: a cached step never equals recomputation bit for bit, even dense. The
    pruned cache must stay within the dense model's own cache-vs-recompute error."""
    from llava_fitprune.core.recipe import builtin_recipe

    cfg, lm, embeds, visual = lm7b
    lm.set_pruning(zero_recipe(cfg["num_hidden_layers"], 576))
    dense_err, dense_agree, _ = _step_vs_recompute(lm, embeds, visual)
    lm.set_pruning(builtin_recipe(0.9))
    pruned_err, pruned_agree, dropped = _step_vs_recompute(lm, embeds, visual)
    overlaps = []
    for i in range(embeds.shape[0]):  # the batch's choices against each sample's own
        lm(inputs_embeds=embeds[i:i + 1], visual_mask=visual[i:i + 1])
        for db, d1 in zip(dropped, lm.last_trace.dropped_positions):
            if d1 is not None:  # [B, N] positions, -1 where nothing is dropped
                mine = set(d1[0][d1[0] >= 0].tolist())
                overlaps.append(len(set(db[i][db[i] >= 0].tolist()) & mine) / max(1, len(mine)))
    print(f"\n7B bf16 next-token logits, cached vs recomputed: dense max|diff| {dense_err:.3f}, "
          f"pruned (0.9) {pruned_err:.3f}; batch-vs-single dropped-token overlap: min {min(overlaps):.3f}, "
          f"mean {sum(overlaps) / len(overlaps):.4f}")
    assert dense_agree and pruned_agree
    assert pruned_err <= 2 * dense_err + 0.05, (pruned_err, dense_err)
    assert min(overlaps) >= 0.9 and sum(overlaps) / len(overlaps) >= 0.98


# --- the fast path (static KV cache, CUDA-graphed decode) in bfloat16 --------------------------------

@torch.no_grad()
@pytest.mark.parametrize("method", ["dense", "fitprune", "fastv", "oracle"])
def test_fast_path_cuda_bf16_same_tokens(tiny_dir, method):
    """bf16 on CUDA: the graphed decode gives the eager path's greedy tokens, padded batch and one by
    one, and a second conversation of the same shapes replays the captured graph."""
    from llava_fitprune.adapters.llava.fast_path import disable_fast_path, enable_fast_path
    from .test_fast_path import METHODS, _gen, _selector_kw

    tok, model, _, _ = load_ours(tiny_dir, "sdpa", "cuda", torch_dtype=torch.bfloat16, **METHODS[method])
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))]).to("cuda", torch.bfloat16)
    ids, mask = batch_ids(tok, QUESTIONS)
    cases = [(ids.cuda(), images, dict(attention_mask=mask.cuda()))]
    cases += [(prompt_ids(tok, q)[None].cuda(), images[i:i + 1], {}) for i, q in enumerate(QUESTIONS)]
    for x, img, kw in cases:
        kw = {**kw, **_selector_kw(method, model, x, img, **kw)}
        disable_fast_path(model)
        eager = _gen(model, x, img, **kw)[0]
        fast = enable_fast_path(model, prefill="eager")  # the compiled prefill: the test below
        assert fast.mode == "graph"
        first = _gen(model, x, img, **kw)[0]
        again = _gen(model, x, img, **kw)[0]
        assert first.tolist() == eager.tolist() and again.tolist() == eager.tolist()
        assert fast.stats["graph_captures"] == 1, fast.stats  # the second run reused buffers and graph
    disable_fast_path(model)


@torch.no_grad()
def test_7b_fast_decode_same_tokens(lm7b):
    """The real 7B shape in bf16, batch 2, FitPrune 0.6: 8 greedy tokens from the graphed decode equal
    the eager loop's."""
    from llava_fitprune.adapters.llava.fast_path import FastPath, FastPathConfig
    from llava_fitprune.bench.measure import EagerRunner, FastRunner
    from llava_fitprune.core.recipe import builtin_recipe

    _, lm, embeds, visual = lm7b
    lm.set_pruning(builtin_recipe(0.6))
    tokens = {}
    fast = FastRunner(FastPath(lm, FastPathConfig(prefill="eager")))  # the compiled prefill: the bench
    for name, runner in (("eager", EagerRunner(lm)), ("fast", fast)):
        logits, cache = runner.prefill(embeds, visual, None, 8)
        seq = []
        for _ in range(8):
            seq.append(logits.argmax(-1))
            logits, cache = runner.step(seq[-1], cache)
        tokens[name] = torch.stack(seq, 1).tolist()
    lm.set_pruning(None)
    assert tokens["fast"] == tokens["eager"]


@torch.no_grad()
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_fast_path_cuda_bf16_compiled_prefill_same_tokens_no_sync(tiny_dir, mode):
    """bf16 on CUDA, FitPrune: the fast path with its compiled prefill (inductor; and with CUDA graphs,
    "reduce-overhead") gives the eager path's greedy tokens, the padded batch and batch 1 for every
    question (one compilation); without CUDA graphs the compiled layer loop never waits for the device
    after compiling (torch.cuda.set_sync_debug_mode("error") around it; graph recording may sync)."""
    from llava_fitprune.adapters.llava.fast_path import disable_fast_path, enable_fast_path
    from .test_fast_path import METHODS, _gen

    tok, model, _, _ = load_ours(tiny_dir, "sdpa", "cuda", torch_dtype=torch.bfloat16, **METHODS["fitprune"])
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))]).to("cuda", torch.bfloat16)
    ids, mask = batch_ids(tok, QUESTIONS)
    cases = [(ids.cuda(), images, dict(attention_mask=mask.cuda()))]  # compiles
    # batch 1: the first compiles
    cases += [(prompt_ids(tok, q)[None].cuda(), images[i:i + 1], {}) for i, q in enumerate(QUESTIONS)]
    eager = [_gen(model, x, img, **kw)[0].tolist() for x, img, kw in cases]
    fast = enable_fast_path(model, prefill="compile", prefill_compile_mode=mode)
    loop = fast.compiled_prefill.compiled
    checked = []

    def no_sync(*args):
        if fast.compiled_prefill.stats.calls < 2 or mode is not None:  # compiling (padded batch, batch 1)
            return loop(*args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return loop(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(True)

    fast.compiled_prefill.compiled = no_sync
    try:
        got = [_gen(model, x, img, **kw)[0].tolist() for x, img, kw in cases]
    finally:
        disable_fast_path(model)
    assert got == eager
    assert (mode is not None or checked) and fast.compiled_prefill.stats.compiling_calls == 2, \
        fast.compiled_prefill.stats
