"""The transformers backend's compiled prefill: compile time cold and warm, graphs, run-time ratio (#25 item 3).

    .venv-hf/bin/python scripts/hf_compile_bench.py [--layers 32] [--json benchmarks/cpu/hf-compile-bench.json]

A 32-layer tiny llava-hf (hidden 64, 4 heads, 576 visual tokens: 336 px / 14; prompt 35 + 576 + 30
tokens; fp32, batch 1, 1 thread), the hf counterpart of scripts/compile_bench.py's tiny LLaVA, through
the public API: `load_pretrained(..., compile=True)`, one `generate` with FitPrune 0.6, then
`set_pruning` to 0.9, to fastv, to another recipe (the 0.6 schedule one layer earlier) and to dense,
a `generate` after each. Each phase runs in a fresh process: "cold" with an empty
TORCHINDUCTOR_CACHE_DIR, "warm" with the cache the cold phase left. Per step: seconds of the first
`generate` and the graphs dynamo made. Then the language model's prefill (the text model's forward
on the prompt's embeddings, a fresh cache each), FitPrune 0.6 and dense in turns (medians), compiled
and eager, and the ratios. Writes JSON, prints a table; the load average is recorded beside the numbers.
"""
import json
import os
import statistics
import sys
import tempfile
import time

from llava_fitprune.bench.phases import bench_parser, parse_bench_args, run_phases, worker_cmd
from llava_fitprune.utils.atomic import write_json



def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    from llava_fitprune import builtin_recipe
    from llava_fitprune.adapters.hf import disable_fast_path, enable_fast_path, load_pretrained

    model, _ = load_pretrained(args.model_dir, compile=True)
    disable_fast_path(model)
    fast = enable_fast_path(model, backend=args.backend)
    gen = torch.Generator().manual_seed(0)
    image_id, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    n_visual = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    words = torch.randint(4, vocab, (args.text_before + args.text_after,), generator=gen)  # ids 0-3: special
    words[words == image_id] = 4 if image_id != 4 else 5  # text is never the image token
    ids = torch.cat([words[:args.text_before], torch.full((n_visual,), image_id), words[args.text_before:]])[None]
    size = model.config.vision_config.image_size
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, size, size,
                                                                                               generator=gen))
    r06 = builtin_recipe(0.6)
    shifted = dict(r06.to_dict(), drop_per_layer=list(r06.drop_per_layer[1:]) + [0], reduction_ratio=None,
                   achieved_reduction=None)
    from llava_fitprune.core.recipe import Recipe

    settings = {"fitprune-0.6": dict(reduction_ratio=0.6), "fitprune-0.9": dict(reduction_ratio=0.9),
                "fastv": dict(reduction_ratio=0.6, method="fastv", num_text_tokens=args.text_before + args.text_after),
                "recipe": dict(recipe=Recipe.from_dict(shifted)),
                "dense": dict()}
    graphs = lambda: int(counters["stats"]["unique_graphs"])  # noqa: E731
    steps = {}
    with torch.inference_mode():
        for name in args.steps:
            model.set_pruning(**settings[name])
            g0, t0 = graphs(), time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            steps[name] = {"first_generate_s": round(time.perf_counter() - t0, 2), "new_graphs": graphs() - g0,
                           "tokens": out[0, ids.shape[1]:].tolist()}
            print(f"  {name}: {steps[name]['first_generate_s']} s, {steps[name]['new_graphs']} new graphs",
                  file=sys.stderr, flush=True)
        run = {}
        if args.repeats:  # the language model's prefill, FitPrune 0.6 and dense in turns, compiled and eager
            lm = model.fitprune_text_model
            captured = {}
            hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
            model.set_pruning(None)
            model(**inputs)
            hook.remove()
            visual = model.fitprune_visual_mask(ids)
            rows = {"dense": dict(recipe=None), "fitprune-0.6": dict(reduction_ratio=0.6)}
            times = {(c, k): [] for c in ("compiled", "eager") for k in rows}
            loop = lm.fitprune.compiled
            for i in range(args.repeats + 1):
                for compiled in ("compiled", "eager"):
                    lm.fitprune.compiled = loop if compiled == "compiled" else None
                    for name, setting in rows.items():
                        model.set_pruning(**setting)
                        lm.fitprune.pending_visual = visual if lm.fitprune.active else None
                        t0 = time.perf_counter()
                        lm(inputs_embeds=captured["inputs_embeds"], attention_mask=captured.get("attention_mask"),
                           position_ids=captured.get("position_ids"), use_cache=True)
                        if i:  # the first turn is a warm-up
                            times[(compiled, name)].append(time.perf_counter() - t0)
            med = {f"{c}/{k}": round(statistics.median(v) * 1e3, 2) for (c, k), v in times.items()}
            ratio = lambda a, b: round(med[a] / med[b], 3)  # noqa: E731
            run = {"prefill_ms": med,
                   "compiled_fitprune_over_compiled_dense": ratio("compiled/fitprune-0.6", "compiled/dense"),
                   "eager_fitprune_over_eager_dense": ratio("eager/fitprune-0.6", "eager/dense"),
                   "compiled_dense_over_eager_dense": ratio("compiled/dense", "eager/dense")}
    return {"steps": steps, "run": run, "graphs_total": graphs(), "compile_stats": {
        "calls": fast.calls, "graphs": fast.graphs, "compile_s": round(fast.compile_s, 2),
        "eager_regions": fast.eager_regions}}


def main(argv=None):
    args = parse_bench_args(bench_parser(__doc__, repeats=5, json_path="benchmarks/cpu/hf-compile-bench.json"), argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from llava_fitprune.adapters.hf.tiny import TinyVlmSpec, build_tiny_llava_hf

    work = tempfile.mkdtemp(prefix="hf-compile-bench-")
    model_dir = build_tiny_llava_hf(os.path.join(work, "llava-hf-tiny"),
                                    TinyVlmSpec(num_layers=args.layers, image_size=336))
    cache = os.path.join(work, "inductor-cache")
    os.makedirs(cache)
    result = {"format": "llava-fitprune.hf-compile-bench", "version": 1, "layers": args.layers,
              "backend": args.backend, "threads": args.threads, "prompt": [args.text_before, "576 visual",
                                                                             args.text_after],
              "cpus": os.cpu_count(), "torch": __import__("torch").__version__, "phases": {}}
    phases = [x for x in args.phases.split(",") if x]
    result["phases"] = run_phases(  # the run-time rows in the last phase only
        phases, lambda phase: worker_cmd(__file__, args, model_dir, args.repeats if phase == phases[-1] else 0),
        cache, args.threads, args.timeout)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, result, indent=1, newline=False)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "steps"} | {
        "steps": {s: {kk: vv for kk, vv in d.items() if kk != "tokens"} for s, d in v.get("steps", {}).items()}}
        for k, v in result["phases"].items()}, indent=1))


if __name__ == "__main__":
    main()
