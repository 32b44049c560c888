#!/usr/bin/env bash
# Everything BENCHMARKS.md's GPU section records, in one command, on a CUDA machine (budget: under
# 10 minutes on an H100/H200; each step has its own time limit):
#   bash scripts/gpu_check.sh [OUT_DIR]                 (default: $OUT if set, else benchmarks/gpu)
#   bash scripts/gpu_check.sh --cpu-smoke OUT_DIR       every step at a tiny shape on the CPU (tests use it)
# 1. the GPU guarantees (tests/test_cuda.py, the fast path's bf16 equivalence included);
# 2. latency at the real LLaVA-1.5-7B shape in bfloat16, sdpa, FitPrune 0.6: batch 1 with stock
#    LLaVA, dense, dense fast path, FitPrune eager and fast path (compiled prefill, graphed decode),
#    oracle eager and fast path; batch 8 on the eager path (prefill, decode per token, end-to-end
#    for 8 and 128 new tokens, compile time, peak memory);
# 3. with EXTRA=1 and time left: where a pruned batch-1 prefill spends its time, eager attention.
# Needs: python with torch (CUDA), this package and its pins (transformers 4.37.2, llava-torch) importable.
set -euo pipefail
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=1
    shift
fi
OUT=${1:-${OUT:-benchmarks/gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-360}

if [ "$SMOKE" = 1 ]; then
    GPU=cpu-smoke
    DT=fp32
    BATCHES=(1 2)
    SHAPE=(--model llava-v1.5-7b --width 64 --heads 2 --prompt-tokens 4 --visual-tokens 48 --text-tokens 3
           --device cpu --dtype float32 --threads 1)
    RUNS=(--warmup 0 --repeats 1 --new-tokens 2)
    "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
else
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine (or --cpu-smoke)'"
    # file names start with the GPU's model, e.g. "NVIDIA H100 80GB HBM3" -> h100
    GPU=$("$PY" -c "import torch; n = torch.cuda.get_device_name().split(); print((n[1] if n[0] == 'NVIDIA' and len(n) > 1 else n[0]).lower())")
    DT=bf16
    BATCHES=(1 8)
    SHAPE=(--model llava-v1.5-7b --dtype bfloat16)
    RUNS=(--warmup 1 --repeats 3 --new-tokens 8 128)
    # the fast path's tests first: they are what a short device window must not miss
    timeout "$STEP_TIMEOUT" "$PY" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k "fast" \
        2>&1 | tee "$OUT/test_cuda_fast.txt" || echo "fast-path tests: FAILED or timed out" | tee -a "$OUT/test_cuda_fast.txt"
    timeout "$STEP_TIMEOUT" "$PY" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -k "not fast" \
        2>&1 | tee "$OUT/test_cuda.txt" || echo "CUDA tests: FAILED or timed out" | tee -a "$OUT/test_cuda.txt"
fi

B=("$PY" -m llava_fitprune.cli bench "${SHAPE[@]}" --reduction-ratio 0.6
   --methods stock dense fitprune oracle --out-dir "$OUT")
# batch 1 with the fast path (its compiled prefill: three compilations, dense / fitprune / oracle, the
# longest step); the batch-8 target (fitprune vs oracle) is the eager path's
timeout "$BENCH_TIMEOUT" "${B[@]}" --compile --attn sdpa --batch-size "${BATCHES[0]}" "${RUNS[@]}" \
    --tag "$GPU-$DT-sdpa-b${BATCHES[0]}-fast" || echo "bench batch ${BATCHES[0]}: FAILED or timed out" >&2
timeout "$STEP_TIMEOUT" "${B[@]}" --attn sdpa --batch-size "${BATCHES[1]}" "${RUNS[@]}" \
    --tag "$GPU-$DT-sdpa-b${BATCHES[1]}" || echo "bench batch ${BATCHES[1]}: FAILED or timed out" >&2

if [ "${EXTRA:-0}" = 1 ] && [ "$SMOKE" = 0 ]; then
    timeout "$STEP_TIMEOUT" "$PY" scripts/profile_prefill.py --model llava-v1.5-7b --ratio 0.9 --dtype bfloat16 \
        --attn sdpa > "$OUT/$GPU-profile-fitprune-0.9-sdpa-b1.txt" 2>&1 || true
    timeout "$STEP_TIMEOUT" "${B[@]}" --attn eager --batch-size 1 "${RUNS[@]}" --tag "$GPU-$DT-eager-b1-fast" || true
fi
echo "wrote $OUT"
