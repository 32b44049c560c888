#!/bin/bash
# LLaVA's TextVQA evaluation with pruning (settings: see _common.sh). Local score.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/textvqa

run_chunks model_vqa_loader $D/answers/$CKPT $D/answers/$CKPT.jsonl textvqa \
    --question-file $D/llava_textvqa_val_v051_ocr.jsonl \
    --image-folder $D/train_images \
    --temperature 0

$PYTHON -m llava_fitprune.eval.score textvqa \
    --annotation-file $D/TextVQA_0.5.1_val.json \
    --result-file $D/answers/$CKPT.jsonl
