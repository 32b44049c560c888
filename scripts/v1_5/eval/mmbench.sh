#!/bin/bash
# LLaVA's MMBench (dev) evaluation with pruning (settings: see _common.sh). Scored by MMBench's server.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
SPLIT=mmbench_dev_20230712
D=./playground/data/eval/mmbench

run_chunks model_vqa_mmbench $D/answers/$SPLIT/$CKPT $D/answers/$SPLIT/$CKPT.jsonl mmbench \
    --question-file $D/$SPLIT.tsv \
    --single-pred-prompt \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_mmbench_for_submission \
    --annotation-file $D/$SPLIT.tsv \
    --result-dir $D/answers/$SPLIT \
    --upload-dir $D/answers_upload/$SPLIT \
    --experiment $CKPT
