#!/bin/bash
# LLaVA's MM-Vet evaluation with pruning (settings: see _common.sh). Graded by MM-Vet's GPT-4 evaluator.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/mm-vet

run_chunks model_vqa $D/answers/$CKPT $D/answers/$CKPT.jsonl mmvet \
    --question-file $D/llava-mm-vet.jsonl \
    --image-folder $D/images \
    --temperature 0

mkdir -p $D/results
$PYTHON -m llava_fitprune.eval.convert.convert_mmvet_for_eval --src $D/answers/$CKPT.jsonl --dst $D/results/$CKPT.json
