"""llava-fitprune: visual-token pruning inside the language model of LLaVA (FitPrune and friends).

Names load lazily, so `python -m llava_fitprune.eval.merge` and other small tools stay quick; the
model classes register with AutoConfig/AutoModelForCausalLM when `llava_fitprune.modeling` loads.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "recipe", "RecipeError": "recipe", "builtin_recipe": "recipe", "load_recipe": "recipe",
    "zero_recipe": "recipe",
    "FitPruneLlavaConfig": "modeling", "FitPruneLlavaLlamaForCausalLM": "modeling",
    "FitPruneLlavaLlamaModel": "modeling", "PruneTrace": "modeling",
    "FitPruneLlavaMistralForCausalLM": "modeling_mistral",
    "FitPruneSelector": "selectors", "OracleSelector": "selectors", "RandomSelector": "selectors",
    "TokenSelector": "selectors", "make_selector": "selectors",
    "load_pretrained_model": "builder", "fit": "fit",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llava_fitprune' has no attribute {name!r}")
