"""LLaVA's standalone eval scripts, loaded from the installed `llava` package by file path.

`import llava.eval.X` first runs `llava/__init__.py`, which loads torch and transformers (seconds);
m4c_evaluator.py and eval_science_qa.py need neither, so the converters and scorers load them
directly, the way LLaVA's own shell scripts run them (`python llava/eval/eval_science_qa.py`).
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from types import ModuleType


def llava_eval_file(name: str) -> str:
    spec = importlib.util.find_spec("llava")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LLaVA is not installed: pip install --no-deps llava-torch (see the README)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "eval", f"{name}.py")
    if not os.path.isfile(path):
        raise ImportError(f"the installed LLaVA has no {path}")
    return path


def load_llava_eval(name: str) -> ModuleType:
    """`llava.eval.<name>` as a module, without importing the `llava` package (for self-contained files)."""
    if f"llava.eval.{name}" in sys.modules:
        return sys.modules[f"llava.eval.{name}"]
    spec = importlib.util.spec_from_file_location(f"_llava_eval_{name}", llava_eval_file(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_llava_eval_script(name: str, argv: list[str]) -> None:
    """Run `python llava/eval/<name>.py ARGV...` in this process."""
    path = llava_eval_file(name)
    saved = sys.argv
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved
