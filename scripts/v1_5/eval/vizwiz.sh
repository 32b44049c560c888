#!/bin/bash
# LLaVA's VizWiz evaluation with pruning (settings: see _common.sh). Scored by the EvalAI server.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/vizwiz

run_chunks model_vqa_loader $D/answers/$CKPT $D/answers/$CKPT.jsonl vizwiz \
    --question-file $D/llava_test.jsonl \
    --image-folder $D/test \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_vizwiz_for_submission \
    --annotation-file $D/llava_test.jsonl \
    --result-file $D/answers/$CKPT.jsonl \
    --result-upload-file $D/answers_upload/$CKPT.json
