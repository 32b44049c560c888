#!/bin/bash
# LLaVA's ScienceQA evaluation with pruning (settings: see _common.sh). Local score (LLaVA's evaluator).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/scienceqa

run_chunks model_vqa_science $D/answers/$CKPT $D/answers/$CKPT.jsonl sqa \
    --question-file $D/llava_test_CQM-A.json \
    --image-folder $D/images/test \
    --single-pred-prompt \
    --temperature 0

$PYTHON -m llava_fitprune.eval.score sqa \
    --base-dir $D \
    --result-file $D/answers/$CKPT.jsonl \
    --output-file $D/answers/${CKPT}_output.jsonl \
    --output-result $D/answers/${CKPT}_result.json
