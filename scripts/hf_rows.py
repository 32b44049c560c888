"""The hf rows of scripts/gpu_check.sh (issue #25 item 5): the transformers backend (.venv-hf's stack)
on llava-hf LLaVA-1.5-7B's shape with random weights, dense vs FitPrune, eager.

The model is transformers' own `LlavaForConditionalGeneration` built from a config (no download):
language model Llama 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32064; vision tower CLIP
ViT-L/14 at 336 (24 layers, hidden 1024, 16 heads: 576 visual tokens), feature layer -2. Smoke runs
scale both with --width / --layers / --image-size. `enable_pruning(model)` then `set_pruning`:
  dense       set_pruning(None): the stock forward
  fitprune    set_pruning(reduction_ratio=--ratio)
Prompt: --prompt-tokens text ids, the image's tokens, --text-tokens text ids (random ids; the image
one pixel tensor from a seeded normal). Per row, runs taken in turns, medians of --repeats:
  prefill ms      model(**inputs, use_cache=True) (vision tower included)
  e2e ms          model.generate(min_new_tokens = max_new_tokens = n, greedy) for each n of --new-tokens
  decode ms/tok   (e2e at the largest n - e2e at the smallest) / (largest - smallest)
  dense-fast, fitprune-fast   the same after `enable_fast_path(model)` (compiled regions; compile s per row),
                              where this base has the hf fast path; else the CSV says "not on this base"
Writes one CSV to --out.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMNS = ["backend", "batch", "method", "ratio", "prefill_ms", "decode_ms_per_token", "e2e_short_ms",
           "short_new_tokens", "e2e_ms", "new_tokens", "speedup", "compile_s", "repeats", "load_avg", "visual_tokens",
           "visual_tokens_kept", "hf_fast_path"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096, help="language model hidden size (MLP scaled alike)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--layers", type=int, default=32, help="language model layers (the built-in recipes need 32)")
    p.add_argument("--vision-width", type=int, default=1024)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--image-size", type=int, default=336, help="(image / 14)^2 visual tokens")
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--prompt-tokens", type=int, default=35)
    p.add_argument("--text-tokens", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, nargs=2, default=[8, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fast-backend", default="inductor",
                   help="torch.compile backend of the fast rows (the CPU smoke run: eager, wiring only)")
    p.add_argument("--out", required=True, help="CSV file to write")
    return p


def build_model(a, dtype, device):
    """llava-hf LLaVA-1.5's architecture at --width etc., random weights, in `dtype` on `device`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab, image_token = 32064, 32000  # llava-hf/llava-1.5-7b-hf: Vicuna's 32000 + <image> + padding
    text = LlamaConfig(vocab_size=vocab, hidden_size=a.width, intermediate_size=a.width * 11008 // 4096,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=a.vision_width, intermediate_size=4 * a.vision_width,
                              num_hidden_layers=a.vision_layers, num_attention_heads=max(a.vision_width // 64, 1),
                              image_size=a.image_size, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.pad_token_id = 0
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of 7B
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), image_token


def make_inputs(a, model, image_token: int, device, dtype) -> dict:
    """input_ids [B, P + V + T] with V image tokens (transformers 5 expands them in the ids), pixels."""
    visual = (a.image_size // 14) ** 2
    gen = torch.Generator().manual_seed(0)
    def text(n):  # random ids below the image token
        return torch.randint(3, image_token, (a.batch_size, n), generator=gen)

    ids = torch.cat([text(a.prompt_tokens), torch.full((a.batch_size, visual), image_token), text(a.text_tokens)], 1)
    pixels = torch.randn(a.batch_size, 3, a.image_size, a.image_size, generator=gen)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=pixels.to(device=device, dtype=dtype))


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def turn(model, inputs: dict, short: int, long_: int, device) -> tuple:
    """(prefill s, generate s for `short` tokens, for `long_` tokens) of the model's current pruning."""
    def gen(n):
        return model.generate(**inputs, min_new_tokens=n, max_new_tokens=n, do_sample=False)

    return (timed(lambda: model(**inputs, use_cache=True), device), timed(lambda: gen(short), device),
            timed(lambda: gen(long_), device))


def measure(a, model, inputs: dict, rows: dict, device, stats=None) -> list[dict]:
    """rows: method -> ratio (None: dense). Turns in order, the first untimed; medians per row.
    stats: the fast path's compile statistics (compile s per row: the seconds of its compiling calls)."""
    short, long_ = a.new_tokens
    runs = {m: {"prefill": [], "short": [], "long": []} for m in rows}
    kept, compile_s = {}, dict.fromkeys(rows, 0.0)  # kept: (visual tokens entering, kept) of sample 0
    with torch.inference_mode():
        for i in range(a.repeats + 1):
            for method, ratio in rows.items():
                model.set_pruning(None) if ratio is None else model.set_pruning(reduction_ratio=ratio)
                before = stats.compile_s if stats is not None else 0.0
                got = turn(model, inputs, short, long_, device)
                compile_s[method] += (stats.compile_s if stats is not None else 0.0) - before
                last = model.fitprune_last  # None when dense
                kept[method] = (last.visual_tokens[0], last.visual_tokens_kept[0]) if last else ("", "")
                if i:
                    for k, t in zip(("prefill", "short", "long"), got):
                        runs[method][k].append(t)
    med = statistics.median
    out = []
    for method, ratio in rows.items():
        r = runs[method]
        e2e_s, e2e_l = med(r["short"]), med(r["long"])
        out.append(dict(backend="hf", batch=a.batch_size, method=method, ratio=ratio or 0.0,
                        prefill_ms=med(r["prefill"]) * 1e3, decode_ms_per_token=(e2e_l - e2e_s) / (long_ - short) * 1e3,
                        e2e_short_ms=e2e_s * 1e3, short_new_tokens=short, e2e_ms=e2e_l * 1e3, new_tokens=long_,
                        compile_s=compile_s[method], repeats=a.repeats, load_avg=os.getloadavg()[0],
                        visual_tokens=kept[method][0], visual_tokens_kept=kept[method][1]))
    return out


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if min(a.batch_size, a.repeats, *a.new_tokens) < 1 or a.new_tokens[0] >= a.new_tokens[1]:
        p.error("--batch-size, --repeats: at least 1; --new-tokens SHORT LONG with 1 <= SHORT < LONG")
    if a.layers != 32:
        p.error(f"--layers {a.layers}: the built-in recipes are LLaVA-1.5-7B's 32 layers; give 32")
    if not 0 <= a.ratio < 1:
        p.error(f"--ratio {a.ratio}: the fraction of FLOPs removed, in [0, 1), e.g. 0.6")
    if os.path.dirname(a.out) and not os.path.isdir(os.path.dirname(a.out)):
        p.error(f"--out {a.out}: folder {os.path.dirname(a.out)} does not exist; create it first")
    if a.threads:
        torch.set_num_threads(a.threads)
    from llava_fitprune.adapters import hf

    has_fast = hasattr(hf, "enable_fast_path") or "enable_fast_path" in getattr(hf, "__all__", ())
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    model, image_token = build_model(a, dtype, device)
    hf.enable_pruning(model)
    inputs = make_inputs(a, model, image_token, device, dtype)
    rows = {"dense": None, "fitprune": a.ratio}
    out = measure(a, model, inputs, rows, device)
    if has_fast:  # after the eager rows: the compiled regions stay on the instance from here on
        stats = hf.enable_fast_path(model, backend=a.fast_backend)
        out += measure(a, model, inputs, {"dense-fast": None, "fitprune-fast": a.ratio}, device, stats)
    note = "on this base: dense-fast and fitprune-fast rows" if has_fast else "not on this base"
    for row in out:
        row.update(speedup=out[0]["prefill_ms"] / row["prefill_ms"], hf_fast_path=note)
    tmp = a.out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(out)
    os.replace(tmp, a.out)
    for row in out:
        print(f"hf {row['method']} B={a.batch_size}: prefill {row['prefill_ms']:.1f} ms ({row['speedup']:.2f}x dense), "
              f"decode {row['decode_ms_per_token']:.1f} ms/token, e2e {a.new_tokens[0]}: {row['e2e_short_ms']:.0f} ms, "
              f"{a.new_tokens[1]}: {row['e2e_ms']:.0f} ms; visual tokens kept {row['visual_tokens_kept'] or 'all'}; "
              f"compile {row['compile_s']:.1f} s")
    print(f"hf fast path: {note}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
