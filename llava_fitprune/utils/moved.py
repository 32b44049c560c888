"""Import paths that moved in the 0.2 layout (issue #22): importing an old one fails with one line naming
the new path, instead of a bare "No module named ...".

The finder sits at the end of `sys.meta_path`, so it is asked only after the real finders found nothing:
it never shadows a module that exists.
"""
from __future__ import annotations

import importlib.abc
import sys

MOVED = {  # old module -> new module
    "llava_fitprune.cli_args": "llava_fitprune.cli.args",
    "llava_fitprune.fit_cli": "llava_fitprune.cli.fit",
    "llava_fitprune.flops_cli": "llava_fitprune.cli.flops",
    "llava_fitprune.demo": "llava_fitprune.cli.demo",
    "llava_fitprune.bench_models": "llava_fitprune.bench.models",
    "llava_fitprune.bench_measure": "llava_fitprune.bench.measure",
    "llava_fitprune.bench_report": "llava_fitprune.bench.report",
    "llava_fitprune.atomic": "llava_fitprune.utils.atomic",
    "llava_fitprune.plots": "llava_fitprune.utils.plots",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            raise ModuleNotFoundError(f"{name} moved to {MOVED[name]} in llava-fitprune 0.2: import that instead",
                                      name=name)
        return None


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
