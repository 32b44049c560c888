"""`llava.eval.model_vqa_mmbench` (MMBench, MMBench-CN) with pruning flags, CPU support and resume.

Question file: MMBench's TSV (index, question, hint, A-D, image as base64, ...), read without pandas.
`--all-rounds` asks each question once per rotation of its options (circular evaluation).
"""
from __future__ import annotations

import os
import sys

from .args import LONG_MAX_NEW_TOKENS, build_parser
from .io import EvalInputError
from .mmbench_tsv import ALL_OPTIONS, get_options, is_none, parse_index, read_tsv
from .runner import cli, get_chunk, run
from .samples import Item, b64_image_error, open_b64_image

SINGLE_PRED_PROMPT = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}


def make_row_items(row: dict, args, source: str | None = None) -> list[Item]:
    options = get_options(row)
    option_chars = ALL_OPTIONS[: len(options)]
    items = []
    for round_idx in range(len(options) if args.all_rounds else 1):
        question = row["question"]
        if not is_none(row.get("hint")):
            question = row["hint"] + "\n" + question
        for char, option in zip(ALL_OPTIONS[: len(options)], options):
            question = question + "\n" + char + ". " + option
        qs = cur_prompt = question
        if args.single_pred_prompt:
            qs = qs + "\n" + SINGLE_PRED_PROMPT["cn" if args.lang == "cn" else "en"]
        record = {"question_id": parse_index(row["index"]), "round_id": round_idx, "prompt": cur_prompt}
        items.append(Item(record=record,
                          text=qs, image_b64=row["image"],
                          extra={"options": list(options), "option_char": list(option_chars)}, source=source,
                          convert_rgb=False))  # LLaVA's load_image_from_base64 keeps the image's mode
        options = options[1:] + options[:1]  # rotate, as LLaVA does
        option_chars = option_chars[1:] + option_chars[:1]
    return items


def require_image_cells(rows: list[dict], path: str) -> None:
    """Every MMBench question has an image; a row without one would be answered text-only, silently."""
    for line, row in enumerate(rows, 2):  # line 1 is the header
        if is_none(row.get("image")):
            raise EvalInputError(f"{row_source(path, line, row)} has no image cell: every MMBench question has an "
                                 f"image; restore the row's base64 image or remove the row")


def row_source(path: str, line: int, row: dict) -> str:
    return f"{path} line {line} (index {row.get('index')})"


def require_decodable_images(rows: list[tuple[int, dict]], path: str) -> None:
    """Each (line, row)'s base64 image opens (its header: a cell cut short inside the pixels is caught
    when the image loads, named the same way), before the model loads."""
    for line, row in rows:
        try:
            open_b64_image(row["image"])
        except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
            raise b64_image_error(row_source(path, line, row), e) from None


def make_items(args) -> list[Item]:
    path = os.path.expanduser(args.question_file)
    _, rows = read_tsv(path)
    require_image_cells(rows, path)
    lines = get_chunk(list(enumerate(rows, 2)), args.num_chunks, args.chunk_idx, path)  # line 1 is the header
    require_decodable_images(lines, path)
    return [item for line, row in lines for item in make_row_items(row, args, row_source(path, line, row))]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0], max_new_tokens=LONG_MAX_NEW_TOKENS)
    return run(parser.parse_args(argv), "model_vqa_mmbench", make_items, auto_mmtag=True)


if __name__ == "__main__":
    sys.exit(cli(main))
