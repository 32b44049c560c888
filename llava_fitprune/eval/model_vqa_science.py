"""`llava.eval.model_vqa_science` (ScienceQA) with pruning flags, CPU support, batches and resume.

Question file: a JSON list of {"id", "conversations": [{"value": ...}, ...], optional "image"}
(LLaVA's llava_test_CQM-A.json). Questions without an image run text-only, as in LLaVA.
"""
from __future__ import annotations

import os
import sys

from .args import LONG_MAX_NEW_TOKENS, build_parser
from .io import EvalInputError, read_json, require_fields, require_image_name
from .runner import cli, get_chunk, run
from .samples import Item

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def make_item(line: dict, args) -> Item:
    qs = line["conversations"][0]["value"].replace("<image>", "").strip()
    cur_prompt = qs
    image_path = None
    if "image" in line:
        image_path = os.path.join(args.image_folder, line["image"])
        cur_prompt = "<image>" + "\n" + cur_prompt
    if args.single_pred_prompt:
        qs = qs + "\n" + SINGLE_PRED_PROMPT
        cur_prompt = cur_prompt + "\n" + SINGLE_PRED_PROMPT
    return Item(record={"question_id": line["id"], "prompt": cur_prompt}, text=qs, image_path=image_path,
                convert_rgb=False)  # LLaVA's model_vqa_science opens the image as it is


def make_items(args) -> list[Item]:
    path = os.path.expanduser(args.question_file)
    questions = read_json(path, "question file")
    if not isinstance(questions, list):
        raise EvalInputError(f"question file {path} holds a {type(questions).__name__}; expected a JSON list "
                             f"of ScienceQA questions (LLaVA's llava_test_CQM-A.json)")
    for i, q in enumerate(questions):
        require_fields(q, ("id", "conversations"), f"question file {path}", i + 1)
        if not q["conversations"] or "value" not in q["conversations"][0]:
            raise EvalInputError(f"question file {path} entry {i + 1} (id {q['id']}) has no first conversation turn")
        if "image" in q:  # LLaVA: a question with the key has an image, one without runs text-only
            require_image_name(q["image"], f"question file {path}", i + 1, q["id"],
                               ', or remove the "image" key to ask it text-only')
    return [make_item(q, args) for q in get_chunk(questions, args.num_chunks, args.chunk_idx, path)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0], question_file="tables/question.json", conv_mode="llava_v0",
                          max_new_tokens=LONG_MAX_NEW_TOKENS)
    return run(parser.parse_args(argv), "model_vqa_science", make_items)


if __name__ == "__main__":
    sys.exit(cli(main))
