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

from ...core.selectors import FastVSelector, FitPruneSelector, RandomSelector, TokenSelector, UniformSelector

_RESTORABLE = {FitPruneSelector: (), FastVSelector: (), UniformSelector: (), RandomSelector: ("seed",)}


def selector_options(selector: TokenSelector) -> Optional[dict]:
    """The JSON options that rebuild `selector` (`make_selector(selector.name, **options)`); None when
    a checkpoint cannot restore it. Exact classes only: a subclass may carry state of its own."""
    names = _RESTORABLE.get(type(selector))
    return None if names is None else {name: getattr(selector, name) for name in names}


def selector_from_config(method: str, options: Optional[dict]) -> TokenSelector:
    """The selector a checkpoint recorded (config.fitprune_method / fitprune_method_options)."""
    restorable = {cls.name: cls for cls in _RESTORABLE}
    if method not in restorable:
        raise ValueError(
            f"config.fitprune_method {method!r} cannot be restored from a checkpoint (restorable: "
            f"{sorted(restorable)}): load it with load_pretrained_model(..., method={method!r}, method_options=...)")
    return restorable[method](**(options or {}))


def refuse_unrestorable(selector: TokenSelector) -> None:
    """Raise before saving a pruning model whose selector the checkpoint could not rebuild."""
    if selector_options(selector) is not None:
        return
    fix = ("save the dense model (model.set_pruning(None)) and load it with load_pretrained_model(..., "
           "method='lvprune', method_options={'modules': folder})" if selector.name == "lvprune" else
           "set a restorable method first (model.set_pruning(recipe, method='fitprune'|'random'|'fastv'|'uniform')) "
           "or save the dense model (model.set_pruning(None))")
    raise ValueError(f"cannot save a model pruning with the {selector.name!r} selector ({type(selector).__name__}): "
                     f"a checkpoint cannot restore it; {fix}")


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
