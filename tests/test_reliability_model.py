"""#16 reliability of the model, recipes and checkpoints: each test fails on the code before the fix."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import llava_fitprune
from llava_fitprune import OracleSelector, Recipe, RecipeError
from .conftest import batch_ids, image_tensor, load_ours, load_stock, prompt_ids

QUESTIONS = ["How many?", "Is the red square left of the blue star? Answer yes or no."]
RECIPE4 = Recipe([100, 250, 60, 0], num_visual_tokens=576)


def _greedy(model, ids, images, **kw):
    return model.generate(ids, images=images, max_new_tokens=5, do_sample=False, **kw)


@torch.no_grad()
@pytest.mark.parametrize("recipe", [None, RECIPE4], ids=["dense", "pruned"])
def test_left_padding_side_batches_like_one_by_one(tiny_dir, recipe, one_thread):
    """tokenizer_padding_side = "left" (LLaVA pads the expanded batch on the left): a short and a long
    prompt batched give each one's tokens alone, and (dense) stock LLaVA's batch."""
    tok, model, _, _ = load_ours(tiny_dir, recipe=recipe)
    model.config.tokenizer_padding_side = "left"
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    batched = _greedy(model, ids, images, attention_mask=mask)
    for i, q in enumerate(QUESTIONS):
        alone = _greedy(model, prompt_ids(tok, q)[None], images[i:i + 1])
        assert batched[i, :alone.shape[1]].tolist() == alone[0].tolist(), f"sample {i}"
    if recipe is None:
        stock = load_stock(tiny_dir)
        stock.config.tokenizer_padding_side = "left"
        assert _greedy(stock, ids, images, attention_mask=mask).tolist() == batched.tolist()


def _turn1(model, tok, ids, images, **kw):
    out = model.generate(ids, images=images, max_new_tokens=3, do_sample=False, use_cache=True,
                         return_dict_in_generate=True, **kw)
    turn2 = tok(" USER: and the square? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    new = torch.cat([out.sequences[:, -1:], turn2.expand(ids.shape[0], -1)], dim=1)  # the last answer token was never fed
    return out.past_key_values, new


def _turn2(model, cache, new, **kw):
    return model.generate(new, past_key_values=copy.deepcopy(cache), max_new_tokens=4, do_sample=False, **kw)


@torch.no_grad()
@pytest.mark.parametrize("recipe", [None, RECIPE4], ids=["dense", "pruned"])
def test_second_turn_mask_is_built_or_checked(tiny_dir, recipe, one_thread):
    tok, model, _, _ = load_ours(tiny_dir, recipe=recipe)
    cache, new = _turn1(model, tok, prompt_ids(tok, QUESTIONS[0])[None], image_tensor(4, 336))
    seen = cache.seen_tokens
    full = torch.ones(1, seen + new.shape[1], dtype=torch.long)
    expected = _turn2(model, cache, new, attention_mask=full)  # = recomputation (test_equivalence)
    assert _turn2(model, cache, new).tolist() == expected.tolist()  # no mask: built from the cache
    with pytest.raises(ValueError, match=f"give a mask of {seen + new.shape[1]} columns"):
        _turn2(model, cache, new, attention_mask=torch.ones_like(new))  # only the new tokens
    with pytest.raises(ValueError, match=f"give a mask of {seen + new.shape[1]} columns"):
        _turn2(model, cache, new, attention_mask=torch.ones(1, seen + new.shape[1] + 3, dtype=torch.long))
    with pytest.raises(ValueError, match=f"give a mask of {seen + new.shape[1]} columns"):
        model(new, past_key_values=copy.deepcopy(cache), attention_mask=torch.ones_like(new))


@torch.no_grad()
def test_second_turn_of_a_padded_batch_without_mask(tiny_dir, one_thread):
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    images = torch.cat([image_tensor(i, 336) for i in range(len(QUESTIONS))])
    ids, mask = batch_ids(tok, QUESTIONS)
    cache, new = _turn1(model, tok, ids, images, attention_mask=mask)
    assert cache.padded
    batched = _turn2(model, cache, new)
    wrong = torch.ones(new.shape[0], cache.seen_tokens + new.shape[1], dtype=torch.long)
    with pytest.raises(ValueError, match="differ from the padding of the cached tokens"):
        _turn2(model, cache, new, attention_mask=wrong)
    for i, q in enumerate(QUESTIONS):
        cache_1, new_1 = _turn1(model, tok, prompt_ids(tok, q)[None], images[i:i + 1])
        if new_1[0, 0] != new[i, 0]:
            continue  # turn 1 answered differently (not the point here; test_equivalence covers it)
        assert _turn2(model, cache_1, new_1)[0].tolist() == batched[i].tolist(), f"sample {i}"


def _dropped(model, tok, seed=9):
    model(prompt_ids(tok, QUESTIONS[1])[None], images=image_tensor(seed, 336))
    return [None if d is None else d.tolist() for d in model.last_trace.dropped_positions]


@torch.no_grad()
@pytest.mark.parametrize("method, kw", [("random", {"recipe": RECIPE4, "method_options": {"seed": 3}}),
                                        ("fastv", {"method_options": {"k": 2, "r": 0.5}})])
def test_saved_method_and_options_are_restored(tiny_dir, tmp_path, method, kw, one_thread):
    tok, model, _, _ = load_ours(tiny_dir, method=method, **kw)
    expected = _dropped(model, tok)
    model.save_pretrained(tmp_path / "llava-saved")
    tok.save_pretrained(tmp_path / "llava-saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llava-saved", torch_dtype=torch.float32).eval()
    reloaded.get_vision_tower().load_model()
    assert reloaded.model.selector.name == method and _dropped(reloaded, tok) == expected
    _, by_loader, _, _ = load_ours(str(tmp_path / "llava-saved"))  # the builder keeps the checkpoint's pruning
    assert by_loader.model.selector.name == method and _dropped(by_loader, tok) == expected
    if method == "random":
        assert reloaded.model.selector.seed == by_loader.model.selector.seed == 3


@torch.no_grad()
def test_saving_an_unrestorable_selector_is_refused(tiny_dir, tmp_path):
    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    model.set_pruning(RECIPE4, OracleSelector([None] * 4))
    with pytest.raises(ValueError, match="cannot save a model pruning with the 'oracle' selector"):
        model.save_pretrained(tmp_path / "llava-saved")
    assert not (tmp_path / "llava-saved").exists()
    model.set_pruning(None, OracleSelector([None] * 4))  # dense: nothing to restore
    model.save_pretrained(tmp_path / "llava-saved")


def test_set_pruning_takes_what_the_loader_takes(tiny_dir, tmp_path):
    _, model, _, _ = load_ours(tiny_dir)
    RECIPE4.save(tmp_path / "r.json")
    for given in (RECIPE4.to_dict(), tmp_path / "r.json", str(tmp_path / "r.json")):
        model.set_pruning(given)
        assert model.recipe == RECIPE4
    with pytest.raises(RecipeError, match="recipe has 32 layers but the model has 4"):
        model.set_pruning(reduction_ratio=0.6)
    model.set_pruning(RECIPE4, method="random", method_options={"seed": 3})
    assert model.model.selector.name == "random" and model.model.selector.seed == 3
    assert model.config.fitprune_method_options == {"seed": 3}
    with pytest.raises(ValueError, match="either a selector or a method"):
        model.set_pruning(RECIPE4, OracleSelector([]), method="random")
    model.set_pruning(reduction_ratio=0.0)
    assert model.recipe is None


@pytest.mark.parametrize("kw, error, message", [
    ({"method": "bogus"}, ValueError, "unknown pruning method 'bogus'"),
    ({"method": "fastv", "method_options": {"kk": 2}}, TypeError, r"takes options \['k', 'r', 'target_reduction'\]"),
    ({"method": "random"}, ValueError, "random uses FitPrune's schedule"),
    ({"method": "lvprune"}, ValueError, "lvprune needs method_options"),
    ({"method_options": {"k": 2}}, ValueError, "method_options given without a method"),
    ({"reduction_ratio": 0.6}, RecipeError, "recipe has 32 layers but the model has 4"),
    ({"recipe": "/nonexistent/r.json"}, RecipeError, "does not exist"),
    ({"torch_dtype": "garbage"}, ValueError, r"torch_dtype 'garbage' is not one of \['bf16', 'bfloat16'"),
])
def test_loader_checks_pruning_arguments_before_reading_weights(tiny_dir, monkeypatch, kw, error, message):
    from llava_fitprune.adapters.llava.modeling import FitPruneLlavaLlamaForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the pruning arguments were checked")

    monkeypatch.setattr(FitPruneLlavaLlamaForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(error, match=message):
        load_ours(tiny_dir, **kw)


@torch.no_grad()
def test_checkpoint_with_its_tower_inside_can_move(tiny_dir, tmp_path):
    from llava_fitprune.adapters.llava.tiny import VISION_SUBDIR

    tok, model, _, _ = load_ours(tiny_dir, recipe=RECIPE4)
    ids, images = prompt_ids(tok, QUESTIONS[0])[None], image_tensor(7, 336)
    expected = model(ids, images=images).logits
    first = tmp_path / "llava-first"
    shutil.copytree(os.path.join(tiny_dir, VISION_SUBDIR), first / VISION_SUBDIR)
    model.save_pretrained(first)
    tok.save_pretrained(first)
    assert json.loads((first / "config.json").read_text())["mm_vision_tower"] == VISION_SUBDIR
    moved = tmp_path / "llava-moved"
    shutil.move(first, moved)
    _, by_loader, _, _ = load_ours(str(moved))
    torch.testing.assert_close(by_loader(ids, images=images).logits, expected, atol=1e-5, rtol=0)
    by_auto = AutoModelForCausalLM.from_pretrained(moved, torch_dtype=torch.float32).eval()
    by_auto.get_vision_tower().load_model()
    torch.testing.assert_close(by_auto(ids, images=images).logits, expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "no-tower")  # the tower is not inside: the path in use is kept
    assert json.loads((tmp_path / "no-tower" / "config.json").read_text())["mm_vision_tower"] == \
        os.path.join(os.path.abspath(tiny_dir), VISION_SUBDIR)


def test_user_files_are_loaded_weights_only(tiny_dir, tmp_path, monkeypatch):
    """torch.load of user files passes weights_only=True itself (the default differs across torch versions)."""
    from llava_fitprune.lvprune.engine import LocalEngine

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    engine = LocalEngine(layer, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), 1, None)
    engine.save_checkpoint(str(tmp_path), {"state": {"step": 3}})
    assert engine.load_checkpoint(str(tmp_path)) == {"state": {"step": 3}}
    # a projector-only checkpoint on top of a base model (LLaVA's model_base route)
    projector_dir = tmp_path / "llava-tiny-projector"
    projector_dir.mkdir()
    config = json.loads(open(os.path.join(tiny_dir, "config.json")).read())
    config["mm_vision_tower"] = os.path.join(os.path.abspath(tiny_dir), config["mm_vision_tower"])
    (projector_dir / "config.json").write_text(json.dumps(config))
    _, model, _, _ = load_ours(tiny_dir)
    torch.save({k: v for k, v in model.state_dict().items() if "mm_projector" in k}, projector_dir / "mm_projector.bin")
    from llava_fitprune import load_pretrained_model

    load_pretrained_model(str(projector_dir), tiny_dir, "llava-tiny-projector", device="cpu")
    assert calls == [True, True]


def test_dry_run_refuses_negative_text_tokens(tmp_path, capsys):
    from llava_fitprune.core.flops import prefill_report, resolve_shape
    from llava_fitprune.core.recipe import builtin_recipe
    from llava_fitprune.cli.fit import main

    builtin_recipe(0.6).save(tmp_path / "r.json")
    assert main(["--dry-run", "--recipe", str(tmp_path / "r.json"), "--num-text-tokens", "-50"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--num-text-tokens is a token count >= 0, got -50" in err
    with pytest.raises(ValueError, match="token counts are >= 0, got -50 text"):
        prefill_report(resolve_shape("llava-v1.5-7b"), -50, 576, None)


def test_import_registers_the_model_types_without_importing_torch(tiny_dir, tmp_path):
    """`import llava_fitprune` (before or after transformers) lets the Auto classes load our checkpoints."""
    ckpt = tmp_path / "llava-ours"
    shutil.copytree(tiny_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llava_fitprune",
                                                  "fitprune_recipe": RECIPE4.to_dict()}))
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(llava_fitprune.__file__)))
    env = {**os.environ, "PYTHONPATH": package_root}
    first = ("import sys, llava_fitprune\n"
             "assert not {'torch', 'transformers', 'llava'} & set(sys.modules), 'heavy imports'\n"
             "from transformers import AutoModelForCausalLM\n"
             f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
             "print(type(m).__name__, list(m.recipe.drop_per_layer))\n")
    out = subprocess.run([sys.executable, "-c", first], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "FitPruneLlavaLlamaForCausalLM [100, 250, 60, 0]"
    after = (f"from transformers import AutoConfig\nimport llava_fitprune\n"
             f"print(type(AutoConfig.from_pretrained({str(ckpt)!r})).__name__)\n")
    out = subprocess.run([sys.executable, "-c", after], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "FitPruneLlavaConfig", out.stderr[-2000:]


@torch.no_grad()
def test_output_attentions_is_none_exactly_at_pruning_layers_as_documented(tiny_dir):
    from llava_fitprune.adapters.llava.modeling import FitPruneLlavaLlamaForCausalLM

    assert "`attentions[l]` is None at every layer that\n        drops tokens" in FitPruneLlavaLlamaForCausalLM.forward.__doc__
    tok, model, _, _ = load_ours(tiny_dir, "eager", recipe=RECIPE4)
    out = model(prompt_ids(tok, QUESTIONS[0])[None], images=image_tensor(8, 336), output_attentions=True)
    assert [a is None for a in out.attentions] == [d > 0 for d in RECIPE4.drop_per_layer]
