"""Where a pruned prefill's time goes: torch.profiler over one FitPrune prefill of a named shape.

python scripts/profile_prefill.py --model llava-v1.5-7b --ratio 0.9 --dtype bfloat16 --attn sdpa
Prints the top operators by self device time (or CPU time without CUDA), and the host-device
synchronisations (`aten::item`, `aten::nonzero`, `cudaStreamSynchronize`) counted per prefill.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from llava_fitprune.bench.models import PromptLayout, build_lm, load_lm_config, make_inputs
from llava_fitprune.core.recipe import builtin_recipe, zero_recipe

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
            "cudaDeviceSynchronize", "cudaMemcpyAsync")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-v1.5-7b")
    p.add_argument("--ratio", type=float, default=0.9, help="0: dense")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=35, help="text tokens before the image")
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=30, help="text tokens after the image")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, has_weights = load_lm_config(args.model)
    lm = build_lm(args.model, cfg, has_weights, args.attn, getattr(torch, args.dtype), device)
    layers = cfg["num_hidden_layers"]
    lm.set_pruning(builtin_recipe(args.ratio) if args.ratio else zero_recipe(layers, args.visual_tokens))
    layout = PromptLayout(args.prompt_tokens, args.visual_tokens, args.text_tokens)
    embeds, visual = make_inputs(lm, layout, args.batch_size)  # [B, N, D], [B, N]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            lm(inputs_embeds=embeds, visual_mask=visual, use_cache=True)
        with profile(activities=activities) as prof:
            lm(inputs_embeds=embeds, visual_mask=visual, use_cache=True)
            if device == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    counts = {e.key: e.count for e in prof.key_averages() if e.key in SYNC_OPS}
    print("host-device syncs per prefill:", counts or "none")


if __name__ == "__main__":
    main()
