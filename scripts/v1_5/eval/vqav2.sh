#!/bin/bash
# LLaVA's VQAv2 test-dev evaluation with pruning (settings: see _common.sh). Scored by the EvalAI server.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
SPLIT=llava_vqav2_mscoco_test-dev2015
D=./playground/data/eval/vqav2
OUT=$D/answers/$SPLIT/$CKPT

run_chunks model_vqa_loader $OUT $OUT/merge.jsonl vqav2 \
    --question-file $D/$SPLIT.jsonl \
    --image-folder $D/test2015 \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_vqav2_for_submission --dir $D --split $SPLIT --ckpt $CKPT
