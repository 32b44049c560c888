"""transformers-native backend (transformers 5.x): FitPrune and the other methods on llava-hf
LLaVA-1.5 (`LlavaForConditionalGeneration`), LLaVA-NeXT (`LlavaNextForConditionalGeneration`),
LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`), Qwen2-VL (`Qwen2VLForConditionalGeneration`),
Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`), Qwen3-VL (`Qwen3VLForConditionalGeneration`) and
InternVL (`InternVLForConditionalGeneration`, Qwen2 or Llama language model). Install: `bash scripts/setup.sh --hf` (.venv-hf).

Public API (stable; the lmms-eval plugin and the flops tools use it):

    from llava_fitprune.adapters.hf import load_pretrained
    model, processor = load_pretrained(pretrained, *, recipe=None, reduction_ratio=None, method="fitprune",
                                       device="cpu", dtype=None, attn_implementation=None, compile=False,
                                       **method_options)

- `pretrained`: hub id or local path. `recipe`: a Recipe or a recipe JSON path; `reduction_ratio`: the
  built-in LLaVA-1.5-7B recipe for that ratio (it applies to any 32-layer model; a recipe with another
  layer count is refused); `method`: fitprune, fastv, uniform, random (`core.methods.build_method`, whose
  options pass through `**method_options`: fastv k, r, target_reduction...). None of them: dense, or
  the pruning a checkpoint saved by `model.save_pretrained` records (recipe, method, options).
  `dtype`: a torch dtype or its name, or "auto" (the checkpoint's; default float32). `attn_implementation`:
  "sdpa" / "eager" / any registered one (layers that drop nothing use it; pruning layers compute their
  attention themselves). Every argument is checked before the weights load (load_args.py): a bad one is
  a one-line ValueError naming it.
- `model` is the transformers model instance (pruning is put on this instance only: its class becomes
  `FitPrune<StockClass>`, a subclass; stock classes are untouched). `model.generate(**processor_outputs,
  max_new_tokens=...)` returns what transformers returns. `model(**inputs)` likewise.
- `model.set_pruning(recipe=None, *, reduction_ratio=None, method="fitprune", selector=None, **options)`:
  change the schedule; `set_pruning(None)` runs the stock forward. Returns the schedule (a Recipe) or None.
- `model.save_pretrained(folder)`: transformers' save, plus `fitprune_recipe`, `fitprune_method` and
  `fitprune_method_options` in config.json (refused for oracle / LVPruning selectors).
- `model.fitprune_last`: a `PrefillRecord` of the last prefill with visual tokens (None when dense or
  before one): `method`, `recipe_fingerprint`, per sample `visual_tokens` (entering the LM),
  `visual_tokens_kept`, `tokens_entering` per layer, `prefill_tflops` and `dense_prefill_tflops` (the
  language model's prefill, core/flops.py's model); `.to_dict()` for logs. `model.fitprune_trace` has
  the dropped original positions per layer (`dropped_positions[l]`: [B, N_l], -1 = kept).
- `enable_pruning(model)` does the same to a model you loaded yourself.
- `compile=True` (or `enable_fast_path(model, backend="inductor", mode=None, **options)` on a loaded model;
  `disable_fast_path(model)` undoes it): prefills, pruned or dense, run each decoder layer through
  `torch.compile`d regions, one graph per kind of layer step for every layer (fast_prefill.py): a
  FitPrune model compiles 2 graphs once, another ratio / recipe / uniform none, fastv two, random one;
  prompt lengths are dynamic; decode steps stay eager. Same kept tokens and greedy tokens as eager.
  A compilation that fails warns once and runs eagerly. `model.fitprune_compile_stats`: calls, graphs,
  compile seconds (None without the fast path). llava-hf, LLaVA-NeXT and Qwen2.5-VL (M-RoPE rows gathered
  with the kept tokens inside the compiled step).

Each sample's visual-token count (anyres, dynamic resolution) gets the recipe scaled to it
(`Recipe.drops_for`). Kept tokens keep their original positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: their 3-D
M-RoPE positions); dropped tokens stay in the KV cache of the layer that dropped them. Qwen3-VL's DeepStack
additions follow the kept rows (qwen3_vl.py). Sliding-window layers (Mistral, Qwen2 `use_sliding_window`)
apply the window to original positions (window.py; sdpa or eager).
"""
from importlib import import_module

_EXPORTS = {"load_pretrained": "loading", "enable_pruning": "loading", "enable_fast_path": "fast_prefill",
            "disable_fast_path": "fast_prefill", "PrefillRecord": "model",
            "PrunedCache": "cache", "QwenImageTextProcessor": "qwen2_5_vl",
            "InternVLImageTextProcessor": "internvl",
            "OnevisionImageTextProcessor": "llava_onevision"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
