#!/bin/bash
# LLaVA's GQA evaluation with pruning (settings: see _common.sh). Local accuracy; GQA's own
# eval.py also runs when the GQA distribution put it at $GQADIR/eval/eval.py.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
SPLIT=llava_gqa_testdev_balanced
GQADIR=./playground/data/eval/gqa/data
OUT=./playground/data/eval/gqa/answers/$SPLIT/$CKPT

run_chunks model_vqa_loader $OUT $OUT/merge.jsonl gqa \
    --question-file ./playground/data/eval/gqa/$SPLIT.jsonl \
    --image-folder $GQADIR/images \
    --temperature 0

$PYTHON -m llava_fitprune.eval.convert.convert_gqa_for_eval --src $OUT/merge.jsonl --dst $GQADIR/testdev_balanced_predictions.json
$PYTHON -m llava_fitprune.eval.score gqa --data-dir $GQADIR --tier testdev_balanced --score-file $OUT/merge.jsonl.score.json

if [ -f $GQADIR/eval/eval.py ]; then
    (cd $GQADIR && $PYTHON eval/eval.py --tier testdev_balanced) || echo "GQA's eval.py failed (it needs the full GQA distribution)" >&2
fi
