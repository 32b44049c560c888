"""The package's plan stays true (issue #22): `core/` imports nothing from the packages above it, and the
import paths that moved in 0.2 fail with one line naming the new path."""
import ast
import os
import subprocess
import sys

import pytest

import llava_fitprune

PACKAGE = os.path.dirname(llava_fitprune.__file__)
# utils/ sits below the core (atomic writes, plots of recipes given to it), every other package above it
ABOVE_CORE = ("adapters", "lvprune", "eval", "cli", "bench", "synth", "serve", "lmms_eval_plugin")
CORE_FILES = sorted(os.path.join(dirpath, f) for dirpath, _, files in os.walk(os.path.join(PACKAGE, "core"))
                    for f in files if f.endswith(".py"))


def test_importing_every_core_module_loads_nothing_above_it():
    code = ("import importlib, pkgutil, sys, llava_fitprune.core as core\n"
            "for m in pkgutil.iter_modules(core.__path__):\n"
            "    importlib.import_module('llava_fitprune.core.' + m.name)\n"
            "print('\\n'.join(sorted(n for n in sys.modules if n.startswith('llava_fitprune.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert any(n.startswith("llava_fitprune.core.") for n in loaded)  # the probe did import the core
    above = [n for n in loaded if n.split(".")[1] in ABOVE_CORE]
    assert not above, f"importing llava_fitprune.core loaded {above}"


def _imported_names(path: str) -> list[str]:
    """Every module a file names in an import, at any depth (function-local imports too), resolved to
    `llava_fitprune.X...`; an import by name (`import_module`, `__import__`) counts as a package above."""
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
    package = rel[:-1]
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.Name) and node.id in ("import_module", "__import__") or \
                isinstance(node, ast.Attribute) and node.attr in ("import_module", "__import__"):
            names.append("llava_fitprune.adapters (imported by name: the core imports nothing by name)")
    return names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: os.path.relpath(p, PACKAGE))
def test_core_source_names_no_package_above_it(path):
    bad = [n for n in _imported_names(path) if n.startswith("llava_fitprune.") and n.split(".")[1] in ABOVE_CORE]
    assert not bad, f"{os.path.relpath(path, PACKAGE)} imports {bad}: the core must not depend on them"


@pytest.mark.parametrize("old,new", [("llava_fitprune.fit_cli", "llava_fitprune.cli.fit"),
                                     ("llava_fitprune.atomic", "llava_fitprune.utils.atomic"),
                                     ("llava_fitprune.bench_models", "llava_fitprune.bench.models")])
def test_a_moved_import_path_fails_with_one_line_naming_the_new_one(old, new):
    with pytest.raises(ModuleNotFoundError, match=f"{old} moved to {new}"):
        __import__(old)
    __import__(new)  # and the new one imports
