#!/bin/bash
# LLaVA's MME evaluation with pruning (settings: see _common.sh). Local score (MME's calculation).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/MME

run_chunks model_vqa_loader $D/answers/$CKPT $D/answers/$CKPT.jsonl mme \
    --question-file $D/llava_mme.jsonl \
    --image-folder $D/MME_Benchmark_release_version \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_mme --data-dir $D --experiment $CKPT
$PYTHON -m llava_fitprune.eval.convert.mme_calculation --results_dir $D/eval_tool/answers/$CKPT \
    --score-file $D/answers/$CKPT.jsonl.score.json --answers-file $D/answers/$CKPT.jsonl
