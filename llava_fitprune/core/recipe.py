"""Pruning recipes: how many visual tokens each decoder layer drops, as versioned JSON.

A recipe is fitted for `num_visual_tokens` visual tokens. Applied to a sample with a different
count `n` (LLaVA-NeXT anyres, other resolutions), it is scaled by the *cumulative* rule:

    C_l  = drop_per_layer[0] + ... + drop_per_layer[l]      (tokens gone after layer l)
    C'_l = floor(C_l * n / num_visual_tokens + 0.5)          (round half up)
    d'_l = C'_l - C'_{l-1}

so every per-layer count is non-negative, the total scales exactly (never above `n`), and the
fraction of visual tokens alive entering each layer is the recipe's to within half a token.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

RECIPE_FORMAT = "llava-fitprune.recipe"
RECIPE_SET_FORMAT = "llava-fitprune.recipe-set"
RECIPE_VERSION = 1


class RecipeError(ValueError):
    """A recipe that cannot be used: the message names the problem and the fix."""


def whole_number(value: Any, what: str) -> int:
    """`value` as an int when it is a whole number (an int, or a float with no fraction); else RecipeError.

    Booleans, strings, fractions, NaN and infinities are refused rather than truncated or parsed."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise RecipeError(f"{what} must be a whole number, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise RecipeError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RecipeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Recipe:
    """Immutable: `dataclasses.replace(recipe, ...)` makes a changed copy, validated again."""

    drop_per_layer: tuple[int, ...]  # a list given here is stored as a tuple
    num_visual_tokens: int
    reduction_ratio: float | None = None  # the budget asked for: fraction of FLOPs removed
    achieved_reduction: float | None = None  # what the schedule achieves under `flops_convention`
    flops_convention: str = "total"  # "total" (all prefill tokens) or "visual_only" (paper)
    method: str = "fitprune"
    model: dict[str, Any] = field(default_factory=dict)  # identity: name, layers, hidden size...
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        drops = self.drop_per_layer
        if isinstance(drops, (str, bytes)) or not isinstance(drops, (list, tuple)):
            raise RecipeError(f"drop_per_layer must be a list of whole numbers, got {drops!r}")
        drops = tuple(whole_number(d, f"drop_per_layer[{i}]") for i, d in enumerate(drops))
        object.__setattr__(self, "drop_per_layer", drops)  # frozen: set once, here
        if any(d < 0 for d in drops):
            raise RecipeError(f"recipe has negative drops {list(drops)}: drops are token counts >= 0")
        n_visual = whole_number(self.num_visual_tokens, "num_visual_tokens")
        object.__setattr__(self, "num_visual_tokens", n_visual)
        if n_visual <= 0:
            raise RecipeError(f"num_visual_tokens must be positive, got {n_visual}")
        if self.total_dropped > n_visual:
            raise RecipeError(
                f"recipe drops {self.total_dropped} visual tokens in all but was fitted for only "
                f"{n_visual}: lower the drops or fix num_visual_tokens"
            )
        if self.reduction_ratio is not None:
            check_reduction_ratio(self.reduction_ratio)
        if self.achieved_reduction is not None:
            _finite(self.achieved_reduction, "achieved_reduction")
        if self.flops_convention not in ("total", "visual_only"):
            raise RecipeError(f"flops_convention must be 'total' or 'visual_only', got {self.flops_convention!r}")
        if not isinstance(self.method, str):
            raise RecipeError(f"method must be a string, got {self.method!r}")
        for name in ("model", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise RecipeError(f"{name} must be a JSON object, got {getattr(self, name)!r}")

    @property
    def num_layers(self) -> int:
        return len(self.drop_per_layer)

    @property
    def total_dropped(self) -> int:
        return sum(self.drop_per_layer)

    def visual_tokens_entering(self, num_visual_tokens: int | None = None) -> list[int]:
        """Visual tokens alive entering each layer (length num_layers + 1: the last is after the model)."""
        n = self.num_visual_tokens if num_visual_tokens is None else num_visual_tokens
        alive = [n]
        for d in self.drops_for(n):
            alive.append(alive[-1] - d)
        return alive

    def drops_for(self, num_visual_tokens: int) -> list[int]:
        """Per-layer drops for a sample with `num_visual_tokens` visual tokens (cumulative scaling)."""
        n = int(num_visual_tokens)
        if n == self.num_visual_tokens:
            return list(self.drop_per_layer)
        if n < 0:
            raise RecipeError(f"num_visual_tokens must be >= 0, got {n}")
        out, cum, prev = [], 0, 0
        for d in self.drop_per_layer:
            cum += d
            scaled = math.floor(cum * n / self.num_visual_tokens + 0.5)
            out.append(scaled - prev)
            prev = scaled
        return out

    def check_model(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise RecipeError(
                f"recipe has {self.num_layers} layers but the model has {num_layers} decoder layers: "
                f"fit a recipe for this model (`llava-fitprune fit`)"
            )

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drop_per_layer"] = list(self.drop_per_layer)
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"{source}: a recipe is a JSON object, got {type(d).__name__}")
        if d.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"{source}: not a recipe (format {d.get('format')!r}, expected {RECIPE_FORMAT!r})")
        if d.get("version") != RECIPE_VERSION:
            raise RecipeError(
                f"{source}: recipe version {d.get('version')!r} is not supported (this llava-fitprune "
                f"reads version {RECIPE_VERSION}); upgrade llava-fitprune or re-fit the recipe"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"format", "version"}
        if unknown:
            raise RecipeError(f"{source}: unknown recipe fields {sorted(unknown)}")
        missing = {"drop_per_layer", "num_visual_tokens"} - set(d)
        if missing:
            raise RecipeError(f"{source}: recipe lacks required fields {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        from ..utils.atomic import write_text  # here, not at the top: a one-place change

        write_text(path, self.to_json())  # temporary file, fsync, rename

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


def check_reduction_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise RecipeError(f"reduction_ratio must be a number in [0, 1), e.g. 0.6; got {ratio!r}")
    r = float(ratio)
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise RecipeError(
            f"reduction_ratio {ratio!r} is outside [0, 1): it is the fraction of FLOPs removed, "
            f"e.g. 0.6 (not 60)"
        )
    return r


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_json(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RecipeError(f"recipe file {path} does not exist")
    if os.path.isdir(path):
        raise RecipeError(f"recipe path {path} is a directory: give the recipe's .json file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_refuse_constant)  # NaN / Infinity are not JSON
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not valid JSON (not UTF-8 text: {e}); give the recipe's .json file") from None
    except ValueError as e:  # JSONDecodeError, NaN / Infinity
        raise RecipeError(f"{path} is not valid JSON ({e}); re-create it with `llava-fitprune fit`") from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    return Recipe.from_dict(_read_json(path), source=os.fspath(path))


def zero_recipe(num_layers: int, num_visual_tokens: int) -> Recipe:
    return Recipe([0] * num_layers, num_visual_tokens, reduction_ratio=0.0, achieved_reduction=0.0)


# -- built-in recipes -------------------------------------------------------------------
def builtin_recipe_sets() -> list[str]:
    """Names of the shipped recipe sets (one JSON file each under llava_fitprune/core/recipes/)."""
    files = resources.files("llava_fitprune.core") / "recipes"
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


def builtin_recipes(name: str = "llava-v1.5-7b") -> list[Recipe]:
    path = resources.files("llava_fitprune.core") / "recipes" / f"{name}.json"
    if not path.is_file():
        raise RecipeError(f"no built-in recipe set {name!r}; available: {builtin_recipe_sets()}")
    d = json.loads(path.read_text())
    if d.get("format") != RECIPE_SET_FORMAT or d.get("version") != RECIPE_VERSION:
        raise RecipeError(f"built-in recipe set {name} has an unexpected format/version")
    return [Recipe.from_dict(r, source=f"{name}.json") for r in d["recipes"]]


def builtin_recipe(reduction_ratio: float, name: str = "llava-v1.5-7b") -> Recipe:
    ratio = check_reduction_ratio(reduction_ratio)
    recipes = builtin_recipes(name)
    for r in recipes:
        if r.reduction_ratio is not None and abs(r.reduction_ratio - ratio) < 1e-9:
            return r
    have = sorted(r.reduction_ratio for r in recipes)
    raise RecipeError(
        f"no built-in {name} recipe for reduction_ratio {ratio}; built-in ratios: {have}. "
        f"Fit one with `llava-fitprune fit --reduction-ratio {ratio} ...`"
    )


def resolve_recipe(
    recipe: "Recipe | dict | str | os.PathLike | None" = None,
    reduction_ratio: float | None = None,
    num_layers: int | None = None,
) -> Recipe | None:
    """`recipe` (a Recipe, its dict, or a JSON path) wins; else the built-in recipe for `reduction_ratio`;
    else None."""
    if recipe is not None and reduction_ratio is not None:
        raise RecipeError("give either a recipe or a reduction_ratio, not both")
    if recipe is not None:
        if isinstance(recipe, Recipe):
            r = recipe
        elif isinstance(recipe, dict):
            r = Recipe.from_dict(recipe, source="recipe dict")
        elif isinstance(recipe, (str, os.PathLike)):
            r = load_recipe(recipe)
        else:
            raise RecipeError(f"recipe must be a Recipe, its dict or a JSON path, got {type(recipe).__name__}")
    elif reduction_ratio is not None:
        if check_reduction_ratio(reduction_ratio) == 0.0:
            return None  # no FLOPs removed: the dense model
        r = builtin_recipe(reduction_ratio)
    else:
        return None
    if num_layers is not None:
        r.check_model(num_layers)
    return r
