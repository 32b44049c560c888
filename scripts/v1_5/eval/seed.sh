#!/bin/bash
# LLaVA's SEED-Bench evaluation with pruning (settings: see _common.sh). Local score.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/seed_bench
OUT=$D/answers/$CKPT

run_chunks model_vqa_loader $OUT $OUT/merge.jsonl seed \
    --question-file $D/llava-seed-bench.jsonl \
    --image-folder $D \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_seed_for_submission \
    --annotation-file $D/SEED-Bench.json \
    --result-file $OUT/merge.jsonl \
    --result-upload-file $D/answers_upload/$CKPT.jsonl
