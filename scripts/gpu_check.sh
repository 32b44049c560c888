#!/usr/bin/env bash
# Everything BENCHMARKS.md's GPU section records, in one command, on a CUDA machine (about 8 min on an H100):
#   bash scripts/gpu_check.sh [OUT_DIR]        (default benchmarks/gpu)
# 1. the GPU guarantees (tests/test_cuda.py), 2. where a pruned batch-1 prefill spends its time,
# 3. latency of dense / FitPrune / oracle / prellm at the real LLaVA-1.5-7B shape in bfloat16.
# Needs: python with torch (CUDA), this package and its pins (transformers 4.37.2, llava-torch) importable.
set -euo pipefail
OUT=${1:-benchmarks/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'"
# file names start with the GPU's model, e.g. "NVIDIA H100 80GB HBM3" -> h100
GPU=$("$PY" -c "import torch; n = torch.cuda.get_device_name().split(); print((n[1] if n[0] == 'NVIDIA' and len(n) > 1 else n[0]).lower())")
"$PY" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
"$PY" scripts/profile_prefill.py --model llava-v1.5-7b --ratio 0.9 --dtype bfloat16 --attn sdpa \
    > "$OUT/$GPU-profile-fitprune-0.9-sdpa-b1.txt" 2>&1
B=("$PY" -m llava_fitprune.cli bench --model llava-v1.5-7b --dtype bfloat16 --out-dir "$OUT")
"${B[@]}" --attn sdpa --batch-size 1 --warmup 1 --repeats 3 --tag "$GPU-bf16-sdpa-b1"
"${B[@]}" --attn sdpa --batch-size 8 --warmup 1 --repeats 3 --tag "$GPU-bf16-sdpa-b8"
"${B[@]}" --attn eager --batch-size 1 --warmup 2 --repeats 5 --tag "$GPU-bf16-eager-b1"
if "$PY" -c "import flash_attn" 2>/dev/null; then
    "${B[@]}" --attn flash_attention_2 --batch-size 1 8 --warmup 1 --repeats 3 --tag "$GPU-bf16-flash"
fi
echo "wrote $OUT"
