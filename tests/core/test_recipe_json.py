"""loka.recipe_json: every Recipe round-trips through JSON fields; malformed fields are one line."""

from __future__ import annotations

import json

import pytest

from loka.recipe import RECIPE_NAMES, SCALINGS, GemmRecipe, OperandRecipe, Recipe
from loka.recipe_json import needs_fields, recipe_from_dict, recipe_to_dict, resolve_recipe


@pytest.mark.parametrize("name, scaling", [(n, s) for n in RECIPE_NAMES for s in SCALINGS
                                           if s == "dynamic" or not n.startswith("nvfp4")])  # nvfp4: dynamic only
def test_named_recipes_round_trip_and_need_no_fields(name, scaling):
    r = Recipe.from_name(name, scaling=scaling)
    assert recipe_from_dict(json.loads(json.dumps(recipe_to_dict(r)))) == r
    assert not needs_fields(r) and resolve_recipe(r.name, {}) == r


def test_hand_built_recipes_need_their_fields():
    op = OperandRecipe(format="e4m3", granularity="blockwise", block=(1, 64), history_len=4, scaling="delayed")
    hand = Recipe(name="blocks_of_64", fprop=GemmRecipe(op, op), dgrad=GemmRecipe(op, op), wgrad=GemmRecipe(op, op))
    doc = json.loads(json.dumps(recipe_to_dict(hand)))
    assert doc["fprop"]["a"]["block"] == [1, 64] and recipe_from_dict(doc) == hand
    assert needs_fields(hand) and needs_fields(Recipe.from_name("mx", history_len=32))
    assert resolve_recipe("blocks_of_64", {"blocks_of_64": hand}) is hand
    with pytest.raises(ValueError, match="neither a named loka recipe nor defined"):
        resolve_recipe("blocks_of_64", {})


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("wgrad"), "missing ['wgrad']"),
    (lambda d: d.update(extra=1), "unknown ['extra']"),
    (lambda d: d["fprop"]["a"].update(block=[1, "x"]), "fprop.a.block: expected two integers"),
    (lambda d: d["fprop"]["b"].update(pow2_scale="yes"), "fprop.b.pow2_scale: expected true or false"),
    (lambda d: d["dgrad"]["a"].update(history_len=2.5), "dgrad.a.history_len: expected an integer"),
    (lambda d: d["dgrad"]["a"].update(format="hp"), "dgrad: a GEMM quantizes both operands or neither"),
    (lambda d: d["wgrad"]["b"].update(granularity="columnwise"), "wgrad.b: granularity='columnwise' is not valid"),
])
def test_malformed_fields_are_one_value_error_line(edit, message):
    doc = recipe_to_dict(Recipe.from_name("rowwise"))
    edit(doc)
    with pytest.raises(ValueError) as exc:
        recipe_from_dict(doc)
    assert message in str(exc.value) and "\n" not in str(exc.value)
