"""What a saved pruning model carries: its method and options, and its vision tower's path.

A checkpoint saved by `save_pretrained` records the schedule (`fitprune_recipe`), the token-selection
rule (`fitprune_method`) and that rule's options (`fitprune_method_options`, e.g. random's seed), so a
reload drops the same tokens. Rules whose state is not JSON (LVPruning's trained modules, an oracle's
positions, a user's own selector) cannot be restored: saving such a model is refused.

The vision tower: LLaVA opens `mm_vision_tower` relative to the working directory; a path given
relative to the checkpoint is resolved against it when loading, and written back relative when
saving into a folder where it resolves (a self-contained checkpoint can be moved).
"""
from __future__ import annotations

import os
from typing import Optional

# the method's part is backend-independent (core/saved_method.py); re-exported for this adapter
from ...core.saved_method import refuse_unrestorable, selector_from_config, selector_options  # noqa: F401


def resolve_vision_tower(config, model_dir) -> Optional[str]:
    """Make a `mm_vision_tower` given relative to the checkpoint `model_dir` absolute in `config`;
    return the path as given (None when it was not relative to the checkpoint)."""
    tower = getattr(config, "mm_vision_tower", None)
    if model_dir is None or not tower or os.path.isabs(tower):
        return None
    resolved = os.path.join(os.fspath(model_dir), tower)
    if not os.path.isdir(os.fspath(model_dir)) or not os.path.exists(resolved):
        return None
    config.mm_vision_tower = os.path.abspath(resolved)
    return tower


def tower_path_for_save(config, given: Optional[str], save_directory) -> Optional[str]:
    """The path to write: `given` (relative) when it resolves inside `save_directory`, else the one in use."""
    if given is not None and os.path.exists(os.path.join(os.fspath(save_directory), given)):
        return given
    return getattr(config, "mm_vision_tower", None)
