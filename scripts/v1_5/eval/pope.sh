#!/bin/bash
# LLaVA's POPE evaluation with pruning (settings: see _common.sh). Local score.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/pope

run_chunks model_vqa_loader $D/answers/$CKPT $D/answers/$CKPT.jsonl pope \
    --question-file $D/llava_pope_test.jsonl \
    --image-folder $D/val2014 \
    --temperature 0

$PYTHON -m llava_fitprune.eval.score pope \
    --annotation-dir $D/coco \
    --question-file $D/llava_pope_test.jsonl \
    --result-file $D/answers/$CKPT.jsonl
