"""llava-fitprune: visual-token pruning inside the language model of LLaVA (FitPrune and friends)."""
from .recipe import Recipe, RecipeError, builtin_recipe, load_recipe, zero_recipe
from .modeling import FitPruneLlavaConfig, FitPruneLlavaLlamaForCausalLM, FitPruneLlavaLlamaModel, PruneTrace
from .selectors import FitPruneSelector, OracleSelector, RandomSelector, TokenSelector, make_selector
from .builder import load_pretrained_model
from .fit import fit

__version__ = "0.1.0"

__all__ = [
    "Recipe", "RecipeError", "builtin_recipe", "load_recipe", "zero_recipe",
    "FitPruneLlavaConfig", "FitPruneLlavaLlamaForCausalLM", "FitPruneLlavaLlamaModel", "PruneTrace",
    "FitPruneSelector", "OracleSelector", "RandomSelector", "TokenSelector", "make_selector",
    "load_pretrained_model", "fit", "__version__",
]
