"""Command-line flags of the eval modules: LLaVA's stock flags plus pruning and device flags."""
from __future__ import annotations

import argparse
import os

from .io import EvalInputError

# LLaVA's defaults differ per module (model_vqa_loader: 128 new tokens and llava_v1; model_vqa_science:
# 1024 and llava_v0); each module passes its own.
LOADER_MAX_NEW_TOKENS = 128
LONG_MAX_NEW_TOKENS = 1024


def build_parser(description: str, question_file: str = "tables/question.jsonl", conv_mode: str = "llava_v1",
                 max_new_tokens: int = LOADER_MAX_NEW_TOKENS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    stock = p.add_argument_group("LLaVA's flags")
    stock.add_argument("--model-path", type=str, default="facebook/opt-350m")
    stock.add_argument("--model-base", type=str, default=None)
    stock.add_argument("--image-folder", type=str, default="")
    stock.add_argument("--question-file", type=str, default=question_file)
    stock.add_argument("--answers-file", type=str, default="answer.jsonl")
    stock.add_argument("--conv-mode", type=str, default=conv_mode)
    stock.add_argument("--num-chunks", type=int, default=1)
    stock.add_argument("--chunk-idx", type=int, default=0)
    stock.add_argument("--temperature", type=float, default=0.2)
    stock.add_argument("--top_p", type=float, default=None)
    stock.add_argument("--num_beams", type=int, default=1)
    stock.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    stock.add_argument("--single-pred-prompt", action="store_true")
    stock.add_argument("--answer-prompter", action="store_true", help="accepted, unused (as in LLaVA)")
    stock.add_argument("--all-rounds", action="store_true")
    stock.add_argument("--lang", type=str, default="en")

    prune = p.add_argument_group("pruning")
    which = prune.add_mutually_exclusive_group()
    which.add_argument("--reduction-ratio", type=float, default=None,
                       help="fraction of prefill FLOPs to remove with the built-in recipe (0 = dense)")
    which.add_argument("--recipe", type=str, default=None, help="a recipe JSON file (llava-fitprune fit)")
    prune.add_argument("--method", type=str, default="fitprune",
                       help="fitprune (default), random, fastv, uniform: see scripts/v1_5/eval/_common.sh")

    run = p.add_argument_group("running")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    run.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                     help="default: float16 on CUDA, float32 on CPU")
    run.add_argument("--attn-implementation", choices=("eager", "sdpa", "flash_attention_2"), default=None)
    run.add_argument("--compile", action="store_true",
                     help="the fast path: compiled prefill (CUDA), static KV cache, CUDA-graphed (CUDA) decode; "
                          "see fast_path.py")
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--num-workers", type=int, default=None,
                     help="image-loading workers (default 4 on CUDA, 0 on CPU)")
    run.add_argument("--limit", type=int, default=None,
                     help="answer at most this many more questions, then stop with the file incomplete")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The flags alone, before any file is read: one line naming the flag and the fix."""
    if args.batch_size < 1:
        raise EvalInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_chunks < 1 or not (0 <= args.chunk_idx < args.num_chunks):
        raise EvalInputError(f"--chunk-idx {args.chunk_idx} must be in [0, --num-chunks {args.num_chunks})")
    if args.max_new_tokens < 1:
        raise EvalInputError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise EvalInputError(f"--num_beams must be >= 1 (1: greedy or sampling, no beam search), got {args.num_beams}")
    if not args.temperature >= 0:  # also NaN; a negative one would silently decode greedily
        raise EvalInputError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise EvalInputError(f"--top_p must be in (0, 1], got {args.top_p}; leave it out for no nucleus sampling")
    if args.limit is not None and args.limit < 0:
        raise EvalInputError(f"--limit must be >= 0 (questions to answer in this session), got {args.limit}")
    if args.num_workers is not None and args.num_workers < 0:
        raise EvalInputError(f"--num-workers must be >= 0 (0: load images in this process), got {args.num_workers}")


def check_model_path(args: argparse.Namespace) -> None:
    """The checkpoint exists (or is a hub id), before the question file is read or anything loads."""
    from ..adapters.llava.model_path import model_path_problem

    for flag, path in (("--model-path", args.model_path), ("--model-base", args.model_base)):
        problem = None if path is None else model_path_problem(os.path.expanduser(path))
        if problem:
            raise EvalInputError(f"{flag} {path}: {problem}")
