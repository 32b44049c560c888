#!/bin/bash
# Shared by scripts/v1_5/eval/*.sh (they source it); run them from the repository root, where
# ./playground/data/eval/ holds the benchmarks as LLaVA lays them out. Settings, from the environment:
#
#   MODEL_PATH       checkpoint path or hub id             (default liuhaotian/llava-v1.5-7b)
#   MODEL_BASE       base model for projector-only checkpoints (default: none)
#   REDUCTION_RATIO  fraction of prefill FLOPs removed by the built-in recipe, e.g. 0.6
#   RECIPE           a recipe JSON file instead (llava-fitprune fit)
#   METHOD           which tokens go, and when (llava_fitprune/core/methods.py):
#                      fitprune  FitPrune's recipe for REDUCTION_RATIO / RECIPE; neither: the dense model
#                      random    FitPrune's schedule, random tokens; needs REDUCTION_RATIO or RECIPE
#                      fastv     FastV at equal FLOPs to that FitPrune recipe; neither: FastV's own
#                                defaults, K=2 and R=0.5 (half the visual tokens dropped after layer 2)
#                      uniform   the same count dropped at every layer, at equal FLOPs to that recipe;
#                                needs REDUCTION_RATIO or RECIPE
#                      lvprune   not from these scripts (it needs trained modules: use the Python API)
#                    (default fitprune)
#   CONV_MODE        conversation template                 (default vicuna_v1)
#   GPUS             comma list of GPU ids, one chunk per GPU, e.g. 0,1,2,3; empty: run on the CPU
#   CHUNKS           with GPUS empty: number of CPU chunk processes (default 1)
#   BATCH_SIZE       questions per generate() call         (default 1)
#   COMPILE          1: the fast path (compiled prefill on CUDA, static KV cache, CUDA-graphed decode; --compile);
#                    its compile cache: TORCHINDUCTOR_CACHE_DIR (default .cache/torchinductor), shared by the chunks
#   PYTHON           interpreter (default: the repository's .venv/bin/python when it exists, else python)
#   CKPT             run name used in answer paths, named by what ran (default <model dir>-dense,
#                    <model dir>-<method>-r<ratio>, <model dir>-<method>-<recipe name>,
#                    <model dir>-fastv-k2-r0.5)
#   EXTRA_ARGS       more generation flags, e.g. "--max_new_tokens 16 --attn-implementation sdpa";
#                    "--limit N" answers at most N more questions per chunk, merges what is answered
#                    into a file marked partial and stops before scoring (rerun without it to finish)
#
# An interrupted run resumes when the same command is rerun: finished answers are kept. A rerun with
# other answer-changing settings (model, method, budget, template, decoding flags, question file, image
# folder, device type, dtype, attention) is refused; BATCH_SIZE and COMPILE may change (the answers
# stay the same).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-7b}
METHOD=${METHOD:-fitprune}
CONV_MODE=${CONV_MODE:-vicuna_v1}
BATCH_SIZE=${BATCH_SIZE:-1}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    # scripts/setup.sh installs into the repository's .venv; a bare `python` may lack torch
    if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python; fi
fi

if [ -n "${RECIPE:-}" ] && [ -n "${REDUCTION_RATIO:-}" ]; then
    echo "set RECIPE or REDUCTION_RATIO, not both" >&2
    exit 2
fi
case "$METHOD" in
    fitprune|random|fastv|uniform) ;;
    lvprune) echo "METHOD=lvprune needs its trained modules, which these scripts cannot pass: use the Python API" >&2
             exit 2 ;;
    *) echo "METHOD=$METHOD is not a method: use fitprune, random, fastv or uniform (see _common.sh)" >&2
       exit 2 ;;
esac
PRUNE_ARGS=(--method "$METHOD")
if [ -n "${RECIPE:-}" ]; then
    PRUNE_ARGS+=(--recipe "$RECIPE")
    TAG="$METHOD-$(basename "${RECIPE%.json}")"
elif [ -n "${REDUCTION_RATIO:-}" ]; then
    PRUNE_ARGS+=(--reduction-ratio "$REDUCTION_RATIO")
    TAG="$METHOD-r$REDUCTION_RATIO"
elif [ "$METHOD" = fitprune ]; then
    TAG="dense"
elif [ "$METHOD" = fastv ]; then
    TAG="fastv-k2-r0.5"  # FastV's defaults: FASTV_K, FASTV_R in llava_fitprune/core/methods.py
else
    echo "METHOD=$METHOD needs a budget: set REDUCTION_RATIO (e.g. 0.6) or RECIPE" >&2
    exit 2
fi
CKPT=${CKPT:-$(basename "${MODEL_PATH%/}")-$TAG}
RUN_ARGS=()
case "${COMPILE:-0}" in
    1) RUN_ARGS+=(--compile)
       # one compile cache for the run's chunk processes: the first compiled prefill holds a lock there
       # (fast_prefill.py), so chunk 1 compiles and the others load its graphs instead of compiling too
       export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$REPO_ROOT/.cache/torchinductor} ;;
    0|"") ;;
    *) echo "COMPILE must be 0 or 1, got '$COMPILE'" >&2; exit 2 ;;
esac
MODEL_ARGS=(--model-path "$MODEL_PATH")
if [ -n "${MODEL_BASE:-}" ]; then
    MODEL_ARGS+=(--model-base "$MODEL_BASE")
fi

if [ -n "${GPUS:-}" ]; then
    IFS=',' read -ra GPULIST <<< "$GPUS"
    DEVICE=cuda
else
    if ! [[ "${CHUNKS:-1}" =~ ^[1-9][0-9]*$ ]]; then
        echo "CHUNKS must be a positive integer, got '$CHUNKS'" >&2
        exit 2
    fi
    GPULIST=()
    for _ in $(seq 1 "${CHUNKS:-1}"); do GPULIST+=(""); done
    DEVICE=cpu
fi
NUM_CHUNKS=${#GPULIST[@]}
LIMITED=0
for arg in $EXTRA_ARGS; do
    case "$arg" in --limit|--limit=*) LIMITED=1 ;; esac
done
if [ "$DEVICE" = cpu ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    # share the cores between the chunk processes, as torchrun does
    THREADS=$(( $(nproc) / NUM_CHUNKS ))
    export OMP_NUM_THREADS=$(( THREADS > 0 ? THREADS : 1 ))
fi

# run_chunks MODULE CHUNK_DIR MERGED_FILE BENCHMARK [flags for llava_fitprune.eval.MODULE ...]
# Runs one chunk per GPU (or CPU process) side by side into CHUNK_DIR/<chunks>_<idx>.jsonl, then
# merges them into MERGED_FILE; the merge refuses chunks that did not finish.
run_chunks() {
    local module=$1 chunk_dir=$2 merged=$3 benchmark=$4
    shift 4
    mkdir -p "$chunk_dir"
    local pids=() files=() idx file failed=0
    for idx in $(seq 0 $((NUM_CHUNKS - 1))); do
        file="$chunk_dir/${NUM_CHUNKS}_${idx}.jsonl"
        files+=("$file")
        if [ "$DEVICE" = cuda ]; then
            export CUDA_VISIBLE_DEVICES="${GPULIST[$idx]}"
        fi
        $PYTHON -m "llava_fitprune.eval.$module" "${MODEL_ARGS[@]}" "$@" \
            --answers-file "$file" --num-chunks "$NUM_CHUNKS" --chunk-idx "$idx" \
            --conv-mode "$CONV_MODE" --device "$DEVICE" --batch-size "$BATCH_SIZE" \
            "${PRUNE_ARGS[@]}" "${RUN_ARGS[@]}" $EXTRA_ARGS &
        pids+=($!)
    done
    local bad_input=0 status
    for idx in "${!pids[@]}"; do
        status=0
        wait "${pids[$idx]}" || status=$?
        if [ "$status" -eq 2 ]; then  # the eval modules exit 2 on bad input (their error says what to fix)
            echo "chunk ${files[$idx]} stopped on bad input: fix what its error names, then rerun" >&2
            bad_input=1
        elif [ "$status" -ne 0 ]; then
            echo "chunk ${files[$idx]} failed (exit status $status)" >&2
            failed=1
        fi
    done
    if [ "$bad_input" -ne 0 ]; then
        exit 2
    fi
    if [ "$failed" -ne 0 ]; then
        echo "rerun this script to resume: finished answers are kept" >&2
        exit 1
    fi
    if [ "$LIMITED" -eq 0 ]; then
        $PYTHON -m llava_fitprune.eval.merge --benchmark "$benchmark" --run-name "$CKPT" --out "$merged" "${files[@]}"
        return
    fi
    status=0  # --limit: merge what was answered; a partial merge exits 3 (llava_fitprune/eval/merge.py)
    $PYTHON -m llava_fitprune.eval.merge --partial --benchmark "$benchmark" --run-name "$CKPT" --out "$merged" \
        "${files[@]}" || status=$?
    if [ "$status" -eq 3 ]; then
        echo "--limit: $merged holds part of the answers (marked partial), not scored: rerun to answer more" \
             "(without --limit: all of them, then the run is merged whole and scored)" >&2
        exit 0
    fi
    return "$status"
}
