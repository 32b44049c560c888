#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md, in one command, inside 5 minutes on an H100/H200 (issue #25 item 5):
#   bash scripts/gpu_check.sh [OUT_DIR]              (default: $OUT if set, else benchmarks/gpu)
#   bash scripts/gpu_check.sh --cpu-smoke OUT_DIR    every step at a tiny shape on the CPU (tests use it)
# Budget: TOTAL_BUDGET (default 290 s) for all steps, compiles included; each step also has its own
# limit (below); a step that would start with under MIN_STEP (10) s left is skipped with a note, and a
# step is cut to what is left. In order (the targets first):
#  1. b1    llava-fitprune bench, LLaVA-1.5-7B shape, bf16, sdpa, FitPrune 0.6, batch 1: stock LLaVA,
#           dense, dense-fast, fitprune, fitprune-fast, oracle, oracle-fast (prefill, decode ms/token,
#           end-to-end for 8 and 128 new tokens, compile s and graphs, peak memory; 1 warm-up
#           and 2 timed runs per row, in turns)                                              limit 120 s
#  2. b8    the same at batch 8 (inductor's cache warm from b1)                                 limit  60 s
#  3. eval  scripts/eval_row.py: TextVQA-shaped batch-1 questions, 3 new tokens, stock vs
#           fitprune-fast, a 5,000-question run projected with the compile included (its own,
#           empty inductor cache: a cold compile, as a fresh eval run pays it; 24 questions) limit  50 s
#  4. hf    scripts/hf_rows.py with $PYTHON_HF (the transformers-5 stack): llava-hf LLaVA-1.5-7B
#           shape, dense vs FitPrune 0.6, eager (and fast rows where the base has them), batch 1,
#           1 warm-up and 2 timed turns                                                       limit  40 s
#  5. cuda  tests/test_cuda.py -k fast (the fast path's bf16 equivalence; smoke: collected only):
#           what is left of the budget, at most                                              limit  40 s
#  6. scripts/gpu_targets.py: the targets table (PASS / FAIL / not measured per line), always.
# (the limits add up to 310 s: a slow early step takes from the last ones, never past the budget)
# Outputs (3 files, for the device tool's limit of 8): OUT/targets.md, OUT/gpu_check.log and
# OUT/gpu_check_raw.tar.gz (raw/: each step's CSV / MD / JSON / log).
# Needs: $PYTHON (default python3) with torch (CUDA) and this package's pins (transformers 4.37.2,
# llava-torch), with $PYTHONPATH; $PYTHON_HF (default .venv-hf/bin/python if present, else $PYTHON) with
# transformers 5, with $PYTHONPATH_HF instead (so a PYTHONPATH that carries transformers 4.37.2 for the
# LLaVA steps does not shadow it). The repository root goes first on both paths.
set -uo pipefail
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=1
    shift
fi
OUT=${1:-${OUT:-benchmarks/gpu}}
PY=${PYTHON:-python3}
if [ -n "${PYTHON_HF:-}" ]; then PYHF=$PYTHON_HF
elif [ -x .venv-hf/bin/python ]; then PYHF=.venv-hf/bin/python
else PYHF=$PY; fi
TOTAL_BUDGET=${TOTAL_BUDGET:-290}
MIN_STEP=${MIN_STEP:-10}
RAW="$OUT/raw"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
HF_PATH="$ROOT${PYTHONPATH_HF:+:$PYTHONPATH_HF}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
EVAL_CACHE=$(mktemp -d)  # the eval step's inductor cache: empty, so its projection holds a cold compile
trap 'rm -rf "$EVAL_CACHE"' EXIT
START=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: runs CMD (stdout and stderr to raw/NAME.txt) under min(LIMIT_S, budget left)
step() {
    local name=$1 cap=$2 left t0 rc
    shift 2
    left=$((TOTAL_BUDGET - (SECONDS - START)))
    if [ "$left" -lt "$MIN_STEP" ]; then
        say "step $name: skipped (budget spent: ${TOTAL_BUDGET} s total, ${left} s left)"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    t0=$SECONDS
    timeout "$cap" "$@" > "$RAW/$name.txt" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        say "step $name: ok in $((SECONDS - t0)) s (limit $cap s)"
    elif [ "$rc" = 124 ]; then
        say "step $name: FAILED: timed out after $cap s (tail of raw/$name.txt:)"; tail -n 5 "$RAW/$name.txt" | tee -a "$LOG"
    else
        say "step $name: FAILED: exit $rc after $((SECONDS - t0)) s (tail of raw/$name.txt:)"; tail -n 5 "$RAW/$name.txt" | tee -a "$LOG"
    fi
}

if [ "$SMOKE" = 1 ]; then
    GPU=cpu-smoke; DT=fp32; BATCHES=(1 2)
    SHAPE=(--model llava-v1.5-7b --width 64 --heads 2 --device cpu --threads 1)
    LAYOUT=(--prompt-tokens 4 --visual-tokens 48)
    RUNS=(--warmup 0 --repeats 1 --new-tokens 2 3)
    EVAL=(--questions 3 --text-min 2 --text-max 5 --dtype float32)
    HF=(--width 64 --heads 2 --vision-width 32 --vision-layers 2 --image-size 56 --prompt-tokens 4 --text-tokens 3
        --new-tokens 2 3 --repeats 1 --device cpu --dtype float32 --threads 1 --fast-backend eager)
else
    if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "gpu_check: no CUDA device for $PY: this script is for a GPU machine (or --cpu-smoke OUT_DIR)" >&2
        exit 2
    fi
    # file names start with the GPU's model, e.g. "NVIDIA H100 80GB HBM3" -> h100
    GPU=$("$PY" -c "import torch; n = torch.cuda.get_device_name().split(); print((n[1] if n[0] == 'NVIDIA' and len(n) > 1 else n[0]).lower())")
    DT=bf16; BATCHES=(1 8)
    SHAPE=(--model llava-v1.5-7b)
    LAYOUT=()
    RUNS=(--warmup 1 --repeats 2 --new-tokens 8 128)
    EVAL=(--questions 24)
    HF=(--repeats 2)
fi
mkdir -p "$RAW" || { echo "gpu_check: cannot create $RAW" >&2; exit 2; }
: > "$LOG"
say "gpu_check: $GPU, budget ${TOTAL_BUDGET} s, python $PY, hf python $PYHF, out $OUT"
DTYPE=$([ "$SMOKE" = 1 ] && echo float32 || echo bfloat16)
BENCH=("$PY" -m llava_fitprune.cli bench "${SHAPE[@]}" "${LAYOUT[@]}" --dtype "$DTYPE" --reduction-ratio 0.6
       --methods stock dense fitprune oracle --compile --attn sdpa --out-dir "$RAW" "${RUNS[@]}")
[ "$SMOKE" = 1 ] && BENCH+=(--text-tokens 3)
B1="$GPU-$DT-sdpa-b${BATCHES[0]}"
B8="$GPU-$DT-sdpa-b${BATCHES[1]}"
step b1 120 "${BENCH[@]}" --batch-size "${BATCHES[0]}" --tag "$B1"
step b8 60 "${BENCH[@]}" --batch-size "${BATCHES[1]}" --tag "$B8"
step eval 50 env TORCHINDUCTOR_CACHE_DIR="$EVAL_CACHE" "$PY" scripts/eval_row.py "${SHAPE[@]}" "${LAYOUT[@]}" "${EVAL[@]}" --out "$RAW/eval_row.json"
step hf 40 env PYTHONPATH="$HF_PATH" "$PYHF" scripts/hf_rows.py "${HF[@]}" --out "$RAW/hf_rows.csv"
if [ "$SMOKE" = 1 ]; then
    step cuda 40 "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda.py -k fast
else
    step cuda 40 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k fast
fi
say "steps done in $((SECONDS - START)) s (budget ${TOTAL_BUDGET} s)"
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
"$PY" scripts/gpu_targets.py --b1 "$RAW/$B1.csv" --b8 "$RAW/$B8.csv" --eval "$RAW/eval_row.json" --hf "$RAW/hf_rows.csv" \
    --device "$GPU $DT" "${SMOKE_FLAG[@]}" --out "$OUT/targets.md" | tee -a "$LOG"
tar -czf "$OUT/gpu_check_raw.tar.gz" -C "$OUT" raw && rm -rf "$RAW"
say "wrote $OUT/targets.md, $LOG, $OUT/gpu_check_raw.tar.gz in $((SECONDS - START)) s"
