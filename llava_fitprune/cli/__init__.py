"""`llava-fitprune SUBCOMMAND ...`: each subcommand is a module with `main(argv) -> int`.

fit and flops serve both backends in one module (the checkpoint's config.json picks, cli/backend.py).
Where the two backends' code cannot share a module (the LLaVA one imports llava-torch at the top),
HF_SUBCOMMANDS names the transformers-native module run in .venv-hf; each side refuses the other's
checkpoints in one line naming the right venv."""
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

# subcommand -> its module in the transformers-native backend's venv (.venv-hf)
HF_SUBCOMMANDS = {
    "bench": "llava_fitprune.cli.bench_hf",
    "accuracy": "llava_fitprune.cli.accuracy_hf",
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
    if argv[0] in HF_SUBCOMMANDS:
        from .backend import current_backend

        if current_backend() == "hf":
            name = HF_SUBCOMMANDS[argv[0]]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        print(f"llava-fitprune {argv[0]}: not available in this version ({name} is not installed)", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)
