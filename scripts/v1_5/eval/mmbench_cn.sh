#!/bin/bash
# LLaVA's MMBench-CN (dev) evaluation with pruning (settings: see _common.sh). Scored by MMBench's server.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
SPLIT=mmbench_dev_cn_20231003
D=./playground/data/eval/mmbench_cn

run_chunks model_vqa_mmbench $D/answers/$SPLIT/$CKPT $D/answers/$SPLIT/$CKPT.jsonl mmbench_cn \
    --question-file $D/$SPLIT.tsv \
    --lang cn \
    --single-pred-prompt \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_mmbench_for_submission \
    --annotation-file $D/$SPLIT.tsv \
    --result-dir $D/answers/$SPLIT \
    --upload-dir $D/answers_upload/$SPLIT \
    --experiment $CKPT
