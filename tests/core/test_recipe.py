"""Recipes: named constructors, validation, layering."""

from __future__ import annotations

import pytest

from loka.recipe import RECIPE_NAMES, GemmRecipe, OperandRecipe, Recipe, as_recipe


@pytest.mark.parametrize("name", [n for n in RECIPE_NAMES if n != "bf16"])
@pytest.mark.parametrize("scaling", ["dynamic", "delayed", "static"])
def test_named_recipes_default_formats(name, scaling):
    r = Recipe.from_name(name, scaling=scaling)
    assert r.operand("fprop", "input").format == "e4m3"
    assert r.operand("fprop", "weight").format == "e4m3"
    assert r.operand("dgrad", "grad_output").format == "e5m2"
    assert r.operand("fprop", "input").scaling == scaling
    if name == "rowwise_with_gw_hp":
        assert r.wgrad.is_hp and not r.fprop.is_hp
    else:
        assert r.operand("wgrad", "grad_output").format == "e5m2"


def test_granularity_blocks():
    b = Recipe.from_name("blockwise")
    assert b.operand("fprop", "input").block == (1, 128)
    assert b.operand("fprop", "weight").block == (128, 128)
    mx = Recipe.from_name("mx")
    assert mx.operand("fprop", "input").block == (1, 32) and mx.operand("fprop", "input").pow2


def test_as_recipe_parses_scaling_suffix():
    r = as_recipe("rowwise-delayed")
    assert r.name == "rowwise-delayed" and r.operand("fprop", "input").scaling == "delayed"
    assert as_recipe("bf16").is_hp
    with pytest.raises(ValueError, match="recipe name"):
        as_recipe("fastest")
    with pytest.raises(TypeError):
        as_recipe(3)


def test_validation_messages():
    with pytest.raises(ValueError, match="granularity"):
        OperandRecipe(granularity="columnwise")
    with pytest.raises(ValueError, match="history_len"):
        OperandRecipe(history_len=0)
    with pytest.raises(ValueError, match="both operands or neither"):
        GemmRecipe(OperandRecipe(), OperandRecipe(format="hp"))
    with pytest.raises(ValueError, match="does not take part"):
        Recipe.from_name("tensorwise").operand("fprop", "grad_output")


def test_configs_are_frozen():
    op = OperandRecipe()
    with pytest.raises(AttributeError):
        op.format = "e5m2"
