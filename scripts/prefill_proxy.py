"""Batch-1 prefill on the host-bound CPU proxy (#17): dispatched ops and prefill times, side by side.

python scripts/prefill_proxy.py --width 128 --repeats 15 [--compile inductor]
The proxy: llava-v1.5-7b's depth (32 layers) at a small width, the real 35 + 576 + 30 prompt, a
built-in recipe. Rows: dense (zero recipe), oracle (replays FitPrune's drops: no scoring) and
FitPrune, timed in turns (round robin) so that they see the same machine load; medians and the
ratios to dense are printed. `--compile BACKEND` adds the fast path's prefill (fast_path.py:
the layer loop compiled with BACKEND, writing a static per-layer cache) of dense, oracle and FitPrune,
and its compile time. Only the public API is used, so the script also measures
an older checkout (PYTHONPATH=...).
"""
import argparse
import json
import os
import statistics
import time

import torch

from llava_fitprune import OracleSelector, builtin_recipe, zero_recipe
from llava_fitprune.bench.models import PromptLayout
from llava_fitprune.bench.proxy import OpCounter, build_proxy


def prefill(lm, embeds, visual, selector=None):
    with torch.inference_mode():
        return lm(inputs_embeds=embeds, visual_mask=visual, selector=selector, use_cache=True)


def fast_prefill(fast, embeds, visual, selector, new_tokens):
    with torch.inference_mode():
        return fast.prefill(new_tokens, inputs_embeds=embeds, visual_mask=visual, selector=selector)


def count_ops(lm, embeds, visual, selector=None) -> int:
    prefill(lm, embeds, visual, selector)
    with OpCounter() as counter:
        prefill(lm, embeds, visual, selector)
    return sum(counter.ops.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-v1.5-7b")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--layout", default="35,576,30", help="text before the image, visual tokens, text after")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", default=None, help="a torch.compile backend (inductor, aot_eager) for the fast path")
    p.add_argument("--new-tokens", type=int, default=8, help="room the fast path's static cache reserves")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = PromptLayout(*map(int, args.layout.split(",")))
    recipe = builtin_recipe(args.ratio)
    lm, embeds, visual = build_proxy(args.model, args.width, layout)
    layers = lm.config.num_hidden_layers

    rows = {}  # name -> (model, recipe, selector)
    lm.set_pruning(recipe)
    prefill(lm, embeds, visual)
    oracle = OracleSelector(list(lm.get_model().last_trace.dropped_positions))
    rows["dense"] = (lm, zero_recipe(layers, layout.visual_tokens), None)
    rows["oracle"] = (lm, recipe, oracle)
    rows["fitprune"] = (lm, recipe, None)
    result = {"width": args.width, "layers": layers, "layout": args.layout, "ratio": args.ratio,
              "threads": args.threads, "load_avg_before": os.getloadavg()[0], "ops": {}, "prefill_ms": {}}
    for name, (model, r, sel) in rows.items():
        model.set_pruning(r)
        result["ops"][name] = count_ops(model, embeds, visual, sel)
    pruning_layers = sum(d > 0 for d in recipe.drop_per_layer)
    result["extra_ops_per_pruning_layer"] = {
        k: round((result["ops"][k] - result["ops"]["dense"]) / pruning_layers, 1) for k in ("oracle", "fitprune")}

    runs = {name: (lambda model=model, sel=sel: prefill(model, embeds, visual, sel))
            for name, (model, _, sel) in rows.items()}
    if args.compile:  # the fast path: compiled prefill into a static per-layer cache (fast_path.py)
        from llava_fitprune.adapters.llava.fast_path import FastPath, FastPathConfig

        fast = FastPath(lm, FastPathConfig(prefill="compile", prefill_backend=args.compile))
        result["compile_s"] = {}
        for name in ("dense", "oracle", "fitprune"):
            model, r, sel = rows[name]
            rows[f"{name}-fast"] = (model, r, sel)
            runs[f"{name}-fast"] = lambda sel=sel: fast_prefill(fast, embeds, visual, sel, args.new_tokens)
            model.set_pruning(r)
            t0 = time.perf_counter()
            runs[f"{name}-fast"]()
            result["compile_s"][name] = round(time.perf_counter() - t0, 1)
        result["compiled_graphs"] = fast.compiled_prefill.stats.compiling_calls

    times = {name: [] for name in rows}
    for _ in range(2):  # warm-up
        for name, (model, r, sel) in rows.items():
            model.set_pruning(r)
            runs[name]()
    for _ in range(args.repeats):  # round robin
        for name, (model, r, sel) in rows.items():
            model.set_pruning(r)
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    result["prefill_ms"] = {k: round(v, 2) for k, v in med.items()}
    result["ratio_to_dense"] = {k: round(v / med["dense"], 3) for k, v in med.items()}
    if "dense-fast" in med:
        result["fitprune_fast_over_dense_fast"] = round(med["fitprune-fast"] / med["dense-fast"], 3)
        result["fitprune_fast_over_oracle_fast"] = round(med["fitprune-fast"] / med["oracle-fast"], 3)
        result["dense_fast_over_dense"] = round(med["dense-fast"] / med["dense"], 3)
    result["fitprune_over_oracle"] = round(med["fitprune"] / med["oracle"], 3)
    result["load_avg_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
