"""Argument checks shared by the subcommands, run before any weights load or heavy work starts.

Every failure is one line on stderr, `PROG: error: ARGUMENT VALUE: problem: fix (PROG --help)`, and exit
status 2 (argparse's convention). `Parser` gives argparse's own errors (a bad choice, a non-number)
the same one-line form. `check_common` checks whichever of the shared options a subcommand has:
--device, --threads, --attn / --attn-implementation, --model-path / --model-base, --conv-mode /
--conv-template.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from typing import Iterable, NoReturn

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to look, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def flag(name: str) -> str:
    """`batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def fail(parser: argparse.ArgumentParser, name: str, value, problem: str) -> NoReturn:
    """`PROG: error: --NAME VALUE: problem: fix` (a list value as the user typed it, comma-separated)."""
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    parser.error(f"{flag(name)} {shown}: {problem}")


def comma_list(kind: type, example: str):
    """An argparse `type` for `1,2,3`-style lists of `kind`, with an error that shows the form."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s, "
                                             f"e.g. {example}") from None

    return parse


def check_range(parser, args, names: Iterable[str], *, low=None, high=None, low_open=False, high_open=False,
                hint: str = "") -> None:
    """Each named option (a number, a list of numbers or None) lies in [low, high] ((low, high) where open)."""
    for name in names:
        values = getattr(args, name)
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is None:
                continue
            ok = not (isinstance(v, float) and math.isnan(v))
            ok = ok and (low is None or (v > low if low_open else v >= low))
            ok = ok and (high is None or (v < high if high_open else v <= high))
            if not ok:
                lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
                hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
                fail(parser, name, v, f"must be {' and '.join(x for x in (lo, hi) if x)}{hint}")


def at_least(parser, args, minimum: int, *names: str) -> None:
    check_range(parser, args, names, low=minimum)


def output_dir(parser, args, name: str) -> str:
    """Create the output folder and prove it writable (a file is written and removed)."""
    path = getattr(args, name)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        fail(parser, name, path, f"cannot write there ({e.strerror or e}): pass a folder you can write to")
    return path


def check_device(parser, name: str, device: str | None) -> None:
    if device in (None, "auto"):
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        fail(parser, name, device, "not a device: use cpu, cuda, cuda:N or auto")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            fail(parser, name, device, f"CUDA is not available here (torch {torch.__version__}): use --device cpu "
                                       f"or auto, or install a CUDA build of torch")
        if d.index is not None and d.index >= torch.cuda.device_count():
            fail(parser, name, device, f"this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0..")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        fail(parser, name, device, "MPS is not available here: use --device cpu or auto")
    elif d.type not in ("cpu", "cuda", "mps"):
        fail(parser, name, device, "unsupported device type: use cpu, cuda, cuda:N or auto")


def resolved_device_type(device: str | None) -> str:
    """"cuda" or "cpu" for auto/None (what the subcommands pick), else the given device's type."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def check_attn(parser, name: str, values, device: str | None) -> None:
    """Attention implementations: known names; flash_attention_2 only with flash-attn and CUDA."""
    import importlib.util

    for v in values if isinstance(values, (list, tuple)) else [values]:
        if v is None:
            continue
        if v not in ATTN_IMPLEMENTATIONS:
            fail(parser, name, v, f"unknown attention implementation: choose from {', '.join(ATTN_IMPLEMENTATIONS)}")
        if v == "flash_attention_2":
            if importlib.util.find_spec("flash_attn") is None:
                fail(parser, name, v, "the flash-attn package is not installed: pip install flash-attn (CUDA), "
                                      "or use sdpa")
            if resolved_device_type(device) != "cuda":
                fail(parser, name, v, "flash attention runs on CUDA only: use sdpa, or --device cuda")


def check_model_path(parser, name: str, path: str | None) -> None:
    """A local checkpoint folder with config.json, or a Hugging Face id `org/name` (checked at download)."""
    from ..adapters.llava.model_path import model_path_problem

    problem = None if path is None else model_path_problem(path)
    if problem:
        fail(parser, name, path, problem)


def check_conv_mode(parser, name: str, mode: str | None) -> None:
    if mode is None:
        return
    from llava.conversation import conv_templates

    if mode not in conv_templates:
        fail(parser, name, mode, f"unknown conversation template: choose from {', '.join(sorted(conv_templates))} "
                                 f"(LLaVA-1.5: vicuna_v1)")


def check_threads(parser, name: str, threads: int | None) -> None:
    if threads is not None and threads < 1:
        fail(parser, name, threads, "must be >= 1 (torch CPU threads); leave it out for torch's default")


@contextlib.contextmanager
def loading(prog: str, name: str, value):
    """A model that cannot be loaded (OSError: files missing, a hub id without network) is one line, exit 2."""
    try:
        yield
    except OSError as e:
        print(f"{prog}: error: {flag(name)} {value}: cannot load it ({' '.join(str(e).split())}): pass a local "
              f"checkpoint folder, or check the id and the network", file=sys.stderr)
        raise SystemExit(2) from None


def check_common(parser, args) -> None:
    """The shared options this subcommand has, in the order a user reads them."""
    has = lambda n: getattr(args, n, None) is not None
    for name in ("model_path", "model_base"):
        if has(name):
            check_model_path(parser, name, getattr(args, name))
    if has("device"):
        check_device(parser, "device", args.device)
    if has("threads"):
        check_threads(parser, "threads", args.threads)
    for name in ("attn", "attn_implementation"):
        if has(name):
            check_attn(parser, name, getattr(args, name), getattr(args, "device", None))
    for name in ("conv_mode", "conv_template"):
        if has(name):
            check_conv_mode(parser, name, getattr(args, name))
