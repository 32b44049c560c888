#!/bin/bash
# LLaVA's LLaVA-Bench (in-the-wild) evaluation with pruning (settings: see _common.sh). Graded by
# GPT-4 with LLaVA's review scripts when OPENAI_API_KEY and LLAVA_REPO (a LLaVA source checkout,
# which has llava/eval/table/rule.json) are set.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=./playground/data/eval/llava-bench-in-the-wild

run_chunks model_vqa $D/answers/$CKPT $D/answers/$CKPT.jsonl llavabench \
    --question-file $D/questions.jsonl \
    --image-folder $D/images \
    --temperature 0

if [ -n "${OPENAI_API_KEY:-}" ] && [ -n "${LLAVA_REPO:-}" ]; then
    mkdir -p $D/reviews
    $PYTHON "$LLAVA_REPO/llava/eval/eval_gpt_review_bench.py" \
        --question $D/questions.jsonl \
        --context $D/context.jsonl \
        --rule "$LLAVA_REPO/llava/eval/table/rule.json" \
        --answer-list $D/answers_gpt4.jsonl $D/answers/$CKPT.jsonl \
        --output $D/reviews/$CKPT.jsonl
    $PYTHON "$LLAVA_REPO/llava/eval/summarize_gpt_review.py" -f $D/reviews/$CKPT.jsonl
else
    echo "answers in $D/answers/$CKPT.jsonl; GPT-4 review skipped (set OPENAI_API_KEY and LLAVA_REPO to run it)"
fi
