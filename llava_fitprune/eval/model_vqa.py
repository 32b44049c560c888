"""`llava.eval.model_vqa` with pruning flags, CPU support, batches and resume (LLaVA-Bench, MM-Vet).

The same question format and prompt as `model_vqa_loader`; LLaVA's defaults here are 1024 new
tokens and no plain-model template switch.
"""
from __future__ import annotations

import sys

from .args import LONG_MAX_NEW_TOKENS
from .model_vqa_loader import main as loader_main
from .runner import cli


def main(argv: list[str] | None = None) -> int:
    return loader_main(argv, module="model_vqa", max_new_tokens=LONG_MAX_NEW_TOKENS, auto_mmtag=False)


if __name__ == "__main__":
    sys.exit(cli(main))
