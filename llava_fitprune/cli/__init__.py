"""`llava-fitprune SUBCOMMAND ...`: each subcommand is a module with `main(argv) -> int`."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("llava_fitprune.cli.demo", "run the demo: dense vs pruned answers, FLOPs, timings, a plot"),
    "flops": ("llava_fitprune.cli.flops", "print prefill TFLOPs and reductions of recipes for a config"),
    "fit": ("llava_fitprune.cli.fit", "fit recipes for FLOPs budgets from a calibration set"),
    "bench": ("llava_fitprune.cli.bench", "measure prefill/decode latency, memory, efficiency vs FLOPs"),
    "report": ("llava_fitprune.eval.report", "gather eval results into a table and a plot"),
    "accuracy": ("llava_fitprune.synth.accuracy", "accuracy of every method on the synthetic task"),
    "lvprune-train": ("llava_fitprune.lvprune.train", "train LVPruning modules on a frozen LLaVA"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: llava-fitprune SUBCOMMAND [options]   (SUBCOMMAND --help for its options)\n")
        for name, (_, doc) in SUBCOMMANDS.items():
            print(f"  {name:14s} {doc}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"llava-fitprune: error: unknown subcommand {argv[0]!r}: choose from {', '.join(SUBCOMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0
    name = SUBCOMMANDS[argv[0]][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        print(f"llava-fitprune {argv[0]}: not available in this version ({name} is not installed)", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)
