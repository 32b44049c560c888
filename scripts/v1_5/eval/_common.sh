#!/bin/bash
# Shared by scripts/v1_5/eval/*.sh (they source it); run them from the repository root, where
# ./playground/data/eval/ holds the benchmarks as LLaVA lays them out. Settings, from the environment:
#
#   MODEL_PATH       checkpoint path or hub id             (default liuhaotian/llava-v1.5-7b)
#   MODEL_BASE       base model for projector-only checkpoints (default: none)
#   REDUCTION_RATIO  fraction of prefill FLOPs removed by the built-in recipe, e.g. 0.6
#   RECIPE           a recipe JSON file instead (llava-fitprune fit); neither: the dense model
#   METHOD           token selector: fitprune (default), random
#   CONV_MODE        conversation template                 (default vicuna_v1)
#   GPUS             comma list of GPU ids, one chunk per GPU, e.g. 0,1,2,3; empty: run on the CPU
#   CHUNKS           with GPUS empty: number of CPU chunk processes (default 1)
#   BATCH_SIZE       questions per generate() call         (default 1)
#   COMPILE          1: the fast path (static KV cache, CUDA-graphed decode; --compile)
#   PYTHON           interpreter                           (default python)
#   CKPT             run name used in answer paths         (default <model dir>-<method>-r<ratio>,
#                                                           <model dir>-<method>-<recipe name>, <model dir>-dense)
#   EXTRA_ARGS       more generation flags, e.g. "--max_new_tokens 16 --attn-implementation sdpa"
#
# An interrupted run resumes when the same command is rerun: finished answers are kept.
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-7b}
METHOD=${METHOD:-fitprune}
CONV_MODE=${CONV_MODE:-vicuna_v1}
BATCH_SIZE=${BATCH_SIZE:-1}
PYTHON=${PYTHON:-python}

if [ -n "${RECIPE:-}" ] && [ -n "${REDUCTION_RATIO:-}" ]; then
    echo "set RECIPE or REDUCTION_RATIO, not both" >&2
    exit 2
fi
PRUNE_ARGS=(--method "$METHOD")
if [ -n "${RECIPE:-}" ]; then
    PRUNE_ARGS+=(--recipe "$RECIPE")
    TAG="$METHOD-$(basename "${RECIPE%.json}")"
elif [ -n "${REDUCTION_RATIO:-}" ]; then
    PRUNE_ARGS+=(--reduction-ratio "$REDUCTION_RATIO")
    TAG="$METHOD-r$REDUCTION_RATIO"
else
    TAG="dense"
fi
CKPT=${CKPT:-$(basename "${MODEL_PATH%/}")-$TAG}
RUN_ARGS=()
case "${COMPILE:-0}" in
    1) RUN_ARGS+=(--compile) ;;
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
    for idx in "${!pids[@]}"; do
        wait "${pids[$idx]}" || { echo "chunk ${files[$idx]} failed" >&2; failed=1; }
    done
    if [ "$failed" -ne 0 ]; then
        echo "rerun this script to resume: finished answers are kept" >&2
        exit 1
    fi
    $PYTHON -m llava_fitprune.eval.merge --benchmark "$benchmark" --out "$merged" "${files[@]}"
}
