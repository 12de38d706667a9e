"""Recipes: named constructors, validation, layering."""

from __future__ import annotations

import pytest

from loka.recipe import RECIPE_NAMES, GemmRecipe, OperandRecipe, Recipe, as_recipe


OCP_FP8_NAMES = ("tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise", "mx")


@pytest.mark.parametrize("name", OCP_FP8_NAMES)
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


# name -> (granularity, input/weight format, grad_output format, block, mx rule, grad_output rounding)
NEW_RECIPES = {
    "mxfp8": ("mx", "e4m3", "e4m3", (1, 32), "round_up", "nearest"),
    "mxfp8_floor": ("mx", "e4m3", "e4m3", (1, 32), "floor", "nearest"),
    "nvfp4": ("nvfp4", "e2m1", "e2m1", (1, 16), "round_up", "nearest"),
    "nvfp4_sr": ("nvfp4", "e2m1", "e2m1", (1, 16), "round_up", "stochastic"),
    "tensorwise_fnuz": ("tensorwise", "e4m3fnuz", "e5m2fnuz", (1, 128), "round_up", "nearest"),
    "rowwise_fnuz": ("rowwise", "e4m3fnuz", "e5m2fnuz", (1, 128), "round_up", "nearest"),
}


def test_every_named_recipe_is_covered():
    assert set(RECIPE_NAMES) == {*OCP_FP8_NAMES, *NEW_RECIPES, "bf16"}


@pytest.mark.parametrize("name", sorted(NEW_RECIPES))
def test_device_recipes(name):
    gran, fmt, grad_fmt, block, rule, grad_rounding = NEW_RECIPES[name]
    r = as_recipe(name)
    for gemm, role in (("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output"), ("wgrad", "input")):
        op = r.operand(gemm, role)
        assert (op.granularity, op.block, op.mx_scale_rule) == (gran, block, rule)
        assert op.format == (grad_fmt if role == "grad_output" else fmt)
        assert op.rounding == (grad_rounding if role == "grad_output" else "nearest")
    assert as_recipe(r.name) == r  # the name alone rebuilds it (plans store names)


def test_fp4_recipe_validation():
    with pytest.raises(ValueError, match="format='e2m1'"):
        OperandRecipe(format="e4m3", granularity="nvfp4", block=(1, 16))
    with pytest.raises(ValueError, match="takes granularity 'nvfp4' or 'mx'"):
        OperandRecipe(format="e2m1", granularity="rowwise")
    with pytest.raises(ValueError, match="block=\\(1, 16\\)"):
        OperandRecipe(format="e2m1", granularity="nvfp4")
    with pytest.raises(ValueError, match="scaling='dynamic'"):
        Recipe.from_name("nvfp4", scaling="delayed")
    with pytest.raises(ValueError, match="mx_scale_rule"):
        OperandRecipe(granularity="mx", mx_scale_rule="nearest")
    assert "floor" in as_recipe("mxfp8_floor").fprop.describe()
    assert "/sr" in as_recipe("nvfp4_sr").dgrad.describe() and "/sr" not in as_recipe("nvfp4_sr").fprop.describe()


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
