"""llava-fitprune: visual-token pruning inside the language model of LLaVA (FitPrune and friends).

Names load lazily, so `python -m llava_fitprune.eval.merge` and other small tools stay quick. The
model types are known to AutoConfig/AutoModelForCausalLM from `import llava_fitprune` on, without importing
torch or LLaVA until a checkpoint of ours is loaded (auto_registration.py).
"""
from importlib import import_module

from . import auto_registration
from .utils import moved

auto_registration.install()
moved.install()  # old import paths (0.1's top-level modules) fail with one line naming the new one

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "core.recipe", "RecipeError": "core.recipe", "builtin_recipe": "core.recipe", "load_recipe": "core.recipe",
    "zero_recipe": "core.recipe",
    "FitPruneLlavaConfig": "adapters.llava.modeling", "FitPruneLlavaLlamaForCausalLM": "adapters.llava.modeling",
    "FitPruneLlavaLlamaModel": "adapters.llava.modeling", "PruneTrace": "adapters.llava.modeling",
    "FitPruneLlavaMistralForCausalLM": "adapters.llava.modeling_mistral",
    "FitPruneSelector": "core.selectors", "OracleSelector": "core.selectors", "RandomSelector": "core.selectors",
    "TokenSelector": "core.selectors", "make_selector": "core.selectors",
    "load_pretrained_model": "adapters.llava.builder", "fit": "core.fit",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llava_fitprune' has no attribute {name!r}")
