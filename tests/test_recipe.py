import dataclasses
import json

import pytest

from llava_fitprune.core.recipe import (Recipe, RecipeError, builtin_recipe, builtin_recipes, check_reduction_ratio,
                                   load_recipe, resolve_recipe)
from .conftest import image_tensor, load_ours, prompt_ids


def test_round_trip(tmp_path):
    r = Recipe([0, 3, 5, 0], 16, reduction_ratio=0.4, achieved_reduction=0.41, model={"name": "x"},
               provenance={"seed": 1})
    r.save(tmp_path / "r.json")
    assert load_recipe(tmp_path / "r.json") == r
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "llava-fitprune.recipe"


def test_builtin_recipes_are_the_published_ones():
    rs = builtin_recipes()
    assert [r.reduction_ratio for r in rs] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9]
    r6 = builtin_recipe(0.6)
    assert list(r6.drop_per_layer[:4]) == [14, 33, 89, 36] and r6.total_dropped == 449 and r6.num_layers == 32
    # the paper's visual-only convention: each published schedule reaches its budget from 0.5 on
    assert all(r.achieved_reduction >= r.reduction_ratio for r in rs if r.reduction_ratio >= 0.5)


@pytest.mark.parametrize("n", [576, 2880, 100, 1, 0])
def test_scaling_rule(n):
    r = builtin_recipe(0.9)
    d = r.drops_for(n)
    assert len(d) == 32 and min(d) >= 0
    assert sum(d) == int(r.total_dropped * n / 576 + 0.5)
    alive = r.visual_tokens_entering(n)
    for ours, fitted in zip(alive, r.visual_tokens_entering()):
        assert abs(ours - fitted * n / 576) <= 0.5 + 1e-9


@pytest.mark.parametrize("bad", [-0.1, 1.0, 60, float("nan")])
def test_ratio_outside_range(bad):
    with pytest.raises(RecipeError, match=r"outside \[0, 1\)"):
        check_reduction_ratio(bad)


def test_bad_recipes(tmp_path):
    with pytest.raises(RecipeError, match="drops 20 visual tokens .* only 16"):
        Recipe([10, 10], 16)
    with pytest.raises(RecipeError, match="negative"):
        Recipe([1, -1], 16)
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(p)
    p.write_text(json.dumps({**Recipe([1], 4).to_dict(), "version": 99}))
    with pytest.raises(RecipeError, match="version 99 is not supported"):
        load_recipe(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RecipeError, match="not a recipe"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.json")
    with pytest.raises(RecipeError, match="no built-in .* 0.65"):
        builtin_recipe(0.65)
    with pytest.raises(RecipeError, match="either a recipe or a reduction_ratio"):
        resolve_recipe(Recipe([1], 4), 0.5)


def test_wrong_layer_count_is_refused_by_the_model(tiny_dir):
    with pytest.raises(RecipeError, match="recipe has 32 layers but the model has 4"):
        load_ours(tiny_dir, reduction_ratio=0.6)


def test_recipe_dropping_more_than_the_image_has(tiny_gqa_dir):
    """A recipe fitted for 576 tokens applied to a 64-token image is scaled, never over-dropped."""
    tok, model, _, _ = load_ours(tiny_gqa_dir, recipe=Recipe([500, 70, 0], 576))
    model(prompt_ids(tok, "What?")[None], images=image_tensor(0, 112))
    assert model.last_trace.visual_entering == [[64], [8], [1], [1]]  # 500 -> 56, 570 -> 63 of 64


def _recipe_dict(**fields):
    return {**Recipe([1, 2], 16).to_dict(), **fields}


@pytest.mark.parametrize("fields, message", [
    ({"drop_per_layer": [1.5, 2]}, r"drop_per_layer\[0\] must be a whole number, got 1.5"),
    ({"drop_per_layer": "1234"}, "drop_per_layer must be a list"),
    ({"drop_per_layer": [True, 2]}, r"drop_per_layer\[0\] must be a whole number, got True"),
    ({"drop_per_layer": ["1", 2]}, r"drop_per_layer\[0\] must be a whole number, got '1'"),
    ({"drop_per_layer": None}, "drop_per_layer must be a list"),
    ({"num_visual_tokens": 16.5}, "num_visual_tokens must be a whole number"),
    ({"num_visual_tokens": "576"}, "num_visual_tokens must be a whole number, got '576'"),
    ({"num_visual_tokens": False}, "num_visual_tokens must be a whole number"),
    ({"reduction_ratio": "0.5"}, "reduction_ratio must be a number"),
    ({"reduction_ratio": True}, "reduction_ratio must be a number"),
    ({"achieved_reduction": "x"}, "achieved_reduction must be a finite number"),
    ({"method": 3}, "method must be a string"),
    ({"provenance": [1]}, "provenance must be a JSON object"),
])
def test_recipe_fields_are_checked_strictly(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(_recipe_dict(**fields), source="r.json")
    with pytest.raises(RecipeError, match="^r.json: "):
        Recipe.from_dict(_recipe_dict(**fields), source="r.json")


def test_whole_number_floats_are_counts():
    assert Recipe([1.0, 2], 16.0) == Recipe([1, 2], 16)


@pytest.mark.parametrize("text, message", [
    ("null", "a recipe is a JSON object, got NoneType"),
    ('"576"', "a recipe is a JSON object, got str"),
    (json.dumps(_recipe_dict()).replace('"num_visual_tokens": 16', '"num_visual_tokens": Infinity'), "not valid JSON"),
    (json.dumps(_recipe_dict(drop_per_layer=[float("nan"), 2])), "not valid JSON"),
])
def test_bad_recipe_files_name_the_file(tmp_path, text, message):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(RecipeError, match=f"{p}.*{message}|{message}.*{p}"):
        load_recipe(p)


def test_recipe_path_that_is_a_directory_or_binary(tmp_path):
    with pytest.raises(RecipeError, match=f"{tmp_path} is a directory"):
        load_recipe(tmp_path)
    p = tmp_path / "r.json"
    p.write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(RecipeError, match=f"{p} is not valid JSON \\(not UTF-8"):
        load_recipe(p)


def test_recipe_is_immutable():
    r = Recipe([1, 2], 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.drop_per_layer = [1, -5]
    with pytest.raises(AttributeError):
        r.drop_per_layer.append(3)  # a tuple
    with pytest.raises(RecipeError, match="negative"):
        dataclasses.replace(r, drop_per_layer=[1, -5])
    assert r.to_dict()["drop_per_layer"] == [1, 2] and load_recipe_dict_round_trip(r) == r


def load_recipe_dict_round_trip(r):
    return Recipe.from_dict(json.loads(r.to_json()))


def test_resolve_recipe_accepts_dict_and_path(tmp_path):
    r = Recipe([1, 2], 16)
    r.save(tmp_path / "r.json")
    assert resolve_recipe(r.to_dict()) == resolve_recipe(tmp_path / "r.json") == resolve_recipe(str(tmp_path / "r.json")) == r
    with pytest.raises(RecipeError, match="recipe must be a Recipe, its dict or a JSON path, got list"):
        resolve_recipe([1, 2])
