"""`llava.eval.model_vqa_loader` with pruning flags, CPU support, batches and resume.

Question file: JSONL of {"question_id", "image", "text"} (LLaVA's format for TextVQA, GQA, VQAv2,
VizWiz, POPE, MME, SEED). Run `python -m llava_fitprune.eval.model_vqa_loader --help` for the flags.
"""
from __future__ import annotations

import os
import sys

from .args import LOADER_MAX_NEW_TOKENS, build_parser
from .io import read_jsonl, require_fields, require_image_name
from .runner import cli, get_chunk, run
from .samples import Item

QUESTION_FIELDS = ("question_id", "image", "text")


def make_items(args) -> list[Item]:
    """One item per question line of this chunk: the question text as the prompt, its image by path."""
    path = os.path.expanduser(args.question_file)
    questions = read_jsonl(path, "question file")
    for i, q in enumerate(questions):
        require_fields(q, QUESTION_FIELDS, f"question file {path}", i + 1)
        require_image_name(q["image"], f"question file {path}", i + 1, q["question_id"])
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx, path)
    return [Item(record={"question_id": q["question_id"], "prompt": q["text"]}, text=q["text"],
                 image_path=os.path.join(args.image_folder, q["image"])) for q in questions]


def main(argv: list[str] | None = None, module: str = "model_vqa_loader",
         max_new_tokens: int = LOADER_MAX_NEW_TOKENS, auto_mmtag: bool = True) -> int:
    parser = build_parser(__doc__.splitlines()[0], max_new_tokens=max_new_tokens)
    args = parser.parse_args(argv)
    return run(args, module, make_items, auto_mmtag=auto_mmtag)


if __name__ == "__main__":
    sys.exit(cli(main))
