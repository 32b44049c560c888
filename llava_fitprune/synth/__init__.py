"""A synthetic visual-QA task and a tiny LLaVA-1.5 trained on it: an accuracy signal without real weights.

scenes    seeded scene generator and its LLaVA-format splits (CLI: python -m llava_fitprune.synth.scenes)
train     trains the tiny LLaVA with LLaVA's own classes on CPU (CLI: python -m llava_fitprune.synth.train)
evaluate  greedy generation as model_vqa_loader + exact match, per question type, for any LLaVA-style model

Names below are imported on first use, so `python -m llava_fitprune.synth.<module>` runs cleanly.
"""
from importlib import import_module

_EXPORTS = {
    "evaluate": "evaluate", "evaluate_checkpoint": "evaluate", "QUESTION_TYPES": "questions",
    "SceneConfig": "scenes", "write_dataset": "scenes", "write_split": "scenes", "load_llava": "model_io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
