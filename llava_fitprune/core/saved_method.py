"""What a saved pruning model records of its method, for either backend: the token-selection rule's
name (`fitprune_method`) and JSON options (`fitprune_method_options`), beside its schedule
(`fitprune_recipe`). Rules whose state is not JSON (LVPruning's trained modules, an oracle's
positions, a user's own selector) cannot be restored: saving such a model is refused.
"""
from __future__ import annotations

from typing import Optional

from .selectors import FastVSelector, FitPruneSelector, RandomSelector, TokenSelector, UniformSelector

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
            f"{sorted(restorable)}): load it with method={method!r} and its options given "
            f"(load_pretrained_model(..., method=..., method_options=...) / adapters.hf.load_pretrained(..., method=...))")
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
