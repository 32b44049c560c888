"""Compile time, recompile count and run-time ratio of the compiled prefill, cold and warm (#25).

    .venv/bin/python scripts/compile_bench.py [--layers 32] [--json benchmarks/cpu/compile-bench.json]

A 32-layer tiny LLaVA (hidden 64, vocab 512, 576 visual tokens; prompt 35 + 576 + 30 tokens; fp32,
batch 1, 1 thread), through the public API only: `enable_fast_path(model, prefill="compile")`, then
one `generate` with FitPrune 0.6, then `set_pruning` to 0.9, to fastv, to another recipe (the 0.6
schedule one layer earlier: a fitted recipe's shape) and to dense, a `generate` after each. Each
phase runs in a fresh process: "cold" with an empty TORCHINDUCTOR_CACHE_DIR, "warm" with the cache
the cold phase left. Per step: seconds of the first `generate`, and the graphs dynamo made
(counters["stats"]["unique_graphs"]). Then the run time: the fast path's prefill of FitPrune 0.6
and of dense, timed in turns (medians), and their ratio. Writes JSON and prints a table; the
machine's load average is recorded beside the numbers. Works against an older checkout too
(PYTHONPATH=that checkout): it uses only enable_fast_path, set_pruning, generate and FastPath.prefill.
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
    from llava.constants import IMAGE_TOKEN_INDEX
    from torch._dynamo.utils import counters

    from llava_fitprune import builtin_recipe, load_pretrained_model
    from llava_fitprune.adapters.llava.fast_path import enable_fast_path

    _, model, _, _ = load_pretrained_model(args.model_dir, None, "llava-tiny", device="cpu", torch_dtype=torch.float32)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    before, after = torch.randint(3, vocab, (args.text_before,), generator=gen), \
        torch.randint(3, vocab, (args.text_after,), generator=gen)
    input_ids = torch.cat([before, torch.tensor([IMAGE_TOKEN_INDEX]), after])[None]
    size = model.get_vision_tower().config.image_size
    images = torch.randn(1, 3, size, size, generator=gen)
    r06 = builtin_recipe(0.6)
    shifted = list(r06.drop_per_layer[1:]) + [0]  # the 0.6 schedule one layer earlier
    recipe = dict(r06.to_dict(), drop_per_layer=shifted, reduction_ratio=None, achieved_reduction=None)
    settings = {"fitprune-0.6": dict(reduction_ratio=0.6), "fitprune-0.9": dict(reduction_ratio=0.9),
                "fastv": dict(reduction_ratio=0.6, method="fastv"), "recipe": dict(recipe=recipe),
                "dense": dict()}
    fast = enable_fast_path(model, prefill="compile", prefill_backend=args.backend)

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    steps = {}
    with torch.inference_mode():
        for name in args.steps:
            model.set_pruning(**settings[name])
            g0, t0 = graphs(), time.perf_counter()
            out = model.generate(input_ids, images=images, max_new_tokens=args.new_tokens, do_sample=False)
            steps[name] = {"first_generate_s": round(time.perf_counter() - t0, 2), "new_graphs": graphs() - g0,
                           "tokens": out[0].tolist()}
            print(f"  {name}: {steps[name]['first_generate_s']} s, {steps[name]['new_graphs']} new graphs",
                  file=sys.stderr, flush=True)
        run = {}
        if args.repeats:  # the prefill alone (the language model), FitPrune 0.6 and dense in turns
            (_, pos, mask, _, embeds, _, visual) = model.prepare_multimodal(input_ids, None, None, None, None, images)
            rows = {"dense": {}, "fitprune-0.6": dict(reduction_ratio=0.6)}
            times = {k: [] for k in rows}
            for i in range(args.repeats + 1):
                for name, setting in rows.items():
                    model.set_pruning(**setting)
                    t0 = time.perf_counter()
                    fast.prefill(args.new_tokens, inputs_embeds=embeds, visual_mask=visual, attention_mask=mask,
                                 position_ids=pos)
                    if i:  # the first turn is a warm-up
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            run = {"prefill_ms": {k: round(v, 2) for k, v in med.items()},
                   "fitprune_over_dense": round(med["fitprune-0.6"] / med["dense"], 3)}
    return {"steps": steps, "run": run, "graphs_total": graphs()}  # every graph after a function's first is a recompile


def build(model_dir: str, layers: int) -> None:
    from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

    build_tiny_llava(model_dir, TinyLlavaSpec(num_layers=layers))


def main(argv=None):
    args = parse_bench_args(bench_parser(__doc__, repeats=7, json_path="benchmarks/cpu/compile-bench.json"), argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    work = tempfile.mkdtemp(prefix="compile-bench-")
    model_dir = os.path.join(work, "llava-tiny")
    build(model_dir, args.layers)
    cache = os.path.join(work, "inductor-cache")
    os.makedirs(cache)
    result = {"format": "llava-fitprune.compile-bench", "version": 1, "label": args.label,
              "layers": args.layers, "backend": args.backend, "threads": args.threads,
              "prompt": [args.text_before, "576 visual", args.text_after], "cpus": os.cpu_count(),
              "torch": __import__("torch").__version__, "phases": {}}
    result["phases"] = run_phases([x for x in args.phases.split(",") if x],
                                  lambda phase: worker_cmd(__file__, args, model_dir, args.repeats), cache,
                                  args.threads, args.timeout)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, result, indent=1, newline=False)
    print(table(result))


def table(result: dict) -> str:
    lines = [f"compile bench ({result['label'] or 'this checkout'}): {result['layers']} layers, "
             f"{result['backend']}, {result['threads']} thread(s)",
             "| phase | step | first generate s | new graphs |", "|---|---|---|---|"]
    for phase, out in result["phases"].items():
        for step, s in out.get("steps", {}).items():
            lines.append(f"| {phase} | {step} | {s['first_generate_s']} | {s['new_graphs']} |")
        run = out.get("run") or {}
        if run:
            lines.append(f"| {phase} | prefill ms dense / fitprune-0.6 | {run['prefill_ms']['dense']} / "
                         f"{run['prefill_ms']['fitprune-0.6']} | ratio {run['fitprune_over_dense']} |")
        lines.append(f"| {phase} | (process {out['process_s']} s, load {out['load_avg_before'][0]} -> "
                     f"{out['load_avg_after'][0]}{', ' + out['error'] if 'error' in out else ''}) | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
