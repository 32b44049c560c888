"""Which backend a checkpoint needs, from its config.json alone (before any weights load), and the
one-line refusal when this venv cannot run that backend.

Two backends, two venvs (scripts/setup.sh):
  llava  haotian-liu LLaVA checkpoints (`LlavaLlamaForCausalLM` & co., `mm_*` keys): `.venv`, transformers
         4.37.2 + llava-torch
  hf     transformers-native VLMs (llava-hf, LLaVA-NeXT, Qwen2.5-VL, ...): `.venv-hf`, transformers 5.x.
         Which model types it prunes is the hf backend's own table (adapters/hf/loading.py MODEL_TYPES);
         `check_hf_model_type` asks it, so a new family is one entry there and nothing here.

A haotian-liu checkpoint is recognised by its own architectures (a closed set: llava-torch's classes)
or its `mm_vision_tower` key; every other VLM config (one with a nested `vision_config`) is the hf
backend's; a language-model config alone is the LLaVA backend's (its bench builds one from it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from typing import NoReturn, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# llava-torch's model classes (llava/model/language_model/*.py, llava-torch 1.2.2.post1)
LLAVA_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")
LLAVA_MODEL_TYPES = ("llava_llama", "llava_mistral", "llava_mpt")
VENVS = {"llava": ".venv", "hf": ".venv-hf"}
SETUP = {"llava": "bash scripts/setup.sh", "hf": "bash scripts/setup.sh --hf"}
HF_MIN_TRANSFORMERS = 5


class BackendError(ValueError):
    """A checkpoint no backend takes (no config.json, not a VLM config)."""


def read_config(path: str) -> dict:
    """config.json of a checkpoint folder (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise BackendError(f"{path}: no config.json there: pass a checkpoint folder")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise BackendError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BackendError(f"{file} is not a model config (a JSON object)")
    return config


def backend_of_config(config: dict) -> str:
    """"llava" (haotian-liu LLaVA) or "hf" (transformers-native) for a parsed config.json."""
    architectures = config.get("architectures") or []
    if any(a in LLAVA_ARCHITECTURES for a in architectures) or config.get("model_type") in LLAVA_MODEL_TYPES \
            or "mm_vision_tower" in config:
        return "llava"
    if config.get("model_type") is None:
        raise BackendError("config.json names no model_type: not a transformers checkpoint")
    if "vision_config" in config:  # every transformers-native VLM config nests its vision tower's
        return "hf"
    return "llava"  # a language model alone (a Llama config): the LLaVA backend's bench builds one from it


def detect_backend(path: str) -> str:
    """"llava" | "hf" for a checkpoint folder (or its config.json); only the config is read.
    A path that is not local (a hub id) is taken as the backend of this venv: it is checked at download."""
    if not os.path.exists(path):
        return current_backend()
    return backend_of_config(read_config(path))


def current_backend() -> Optional[str]:
    """The backend this venv runs: transformers >= 5 -> "hf"; an older one with llava-torch -> "llava"."""
    try:
        from transformers import __version__
    except ImportError:
        return None
    if int(__version__.split(".")[0]) >= HF_MIN_TRANSFORMERS:
        return "hf"
    return "llava" if importlib.util.find_spec("llava") is not None else None


def venv_command(backend: str, prog: str, argv: Sequence[str]) -> str:
    """`.venv-hf/bin/llava-fitprune fit ARGS` (relative to here when the checkout is the current folder)."""
    exe = os.path.join(REPO_ROOT, VENVS[backend], "bin", "llava-fitprune")
    rel = os.path.relpath(exe)
    shown = rel if not rel.startswith("..") else exe
    return " ".join([shown, *prog.split()[1:], *map(shlex.quote, argv)])


def wrong_venv(prog: str, backend: str, what: str, argv: Sequence[str]) -> NoReturn:
    have = current_backend()
    this = {"llava": "the LLaVA backend's (transformers 4.37 + llava-torch)",
            "hf": "the transformers-native backend's (transformers 5)"}.get(have, "neither backend's")
    print(f"{prog}: error: {what} is a {'haotian-liu LLaVA' if backend == 'llava' else 'transformers-native'} "
          f"checkpoint and this venv is {this}: run {venv_command(backend, prog, argv)} (set it up with "
          f"{SETUP[backend]})", file=sys.stderr)
    raise SystemExit(2)


def require_backend(prog: str, path: str, argv: Sequence[str], option: str = "--model-path") -> str:
    """The checkpoint's backend, after checking this venv runs it (else one line, exit 2). Reads only config.json."""
    try:
        backend = detect_backend(path)
    except BackendError as e:
        print(f"{prog}: error: {option} {path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if backend is None:
        print(f"{prog}: error: this venv runs neither backend: set one up with {SETUP['llava']} or {SETUP['hf']}",
              file=sys.stderr)
        raise SystemExit(2)
    if current_backend() != backend:
        wrong_venv(prog, backend, f"{option} {path}", argv)
    if backend == "hf" and os.path.exists(path):
        check_hf_model_type(prog, option, path)
    return backend


def check_hf_model_type(prog: str, option: str, path: str) -> None:
    """The hf backend prunes this model type (its own table, adapters/hf/loading.py), else one line, exit 2."""
    from ..adapters.hf.loading import MODEL_TYPES

    model_type = read_config(path).get("model_type")
    if model_type not in MODEL_TYPES:
        print(f"{prog}: error: {option} {path}: model type {model_type!r} is not supported by the transformers "
              f"backend: supported {', '.join(sorted(MODEL_TYPES))}", file=sys.stderr)
        raise SystemExit(2)
