"""A :class:`~loka.recipe.Recipe` as JSON fields, so a hand-built recipe survives a file.

Named recipes travel by name (``"rowwise"``, ``"tensorwise-delayed"``); a recipe built field
by field (or a named one with overrides, whose name no longer says what it does) needs its
fields written down. ``recipe_to_dict`` gives them, ``recipe_from_dict`` rebuilds the frozen,
validated Recipe (one ``ValueError`` line on a malformed document). ``needs_fields`` says
whether a recipe's name alone is not enough: the probe report and the plan write the fields
of exactly those recipes, so files of named recipes stay as they were.

    >>> r = Recipe.from_name("rowwise", pow2_scale=True)
    >>> needs_fields(r), recipe_from_dict(recipe_to_dict(r)) == r
    (True, True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from loka.recipe import GEMMS, GemmRecipe, OperandRecipe, Recipe, as_recipe

_OPERAND_FIELDS = tuple(f.name for f in fields(OperandRecipe))


def recipe_to_dict(recipe: Recipe) -> dict:
    """``{"name", "fprop": {"a": {operand fields}, "b": {...}}, "dgrad": ..., "wgrad": ...}`` (JSON-ready)."""
    out = asdict(recipe)
    for g in GEMMS:
        for side in ("a", "b"):
            out[g][side]["block"] = list(out[g][side]["block"])
    return out


def recipe_from_dict(doc) -> Recipe:
    """The Recipe of :func:`recipe_to_dict`'s document; ``ValueError`` naming the first problem."""
    if not isinstance(doc, dict):
        raise ValueError(f"a recipe is an object with 'name' and {list(GEMMS)}, got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"name", *GEMMS})
    missing = [k for k in ("name", *GEMMS) if k not in doc]
    if unknown or missing or not isinstance(doc["name"], str):
        raise ValueError(f"a recipe has the keys 'name' (a string) and {list(GEMMS)}; "
                         f"missing {missing}, unknown {unknown}")
    return Recipe(name=doc["name"], **{g: _gemm(doc[g], g) for g in GEMMS})


def _gemm(doc, where: str) -> GemmRecipe:
    if not isinstance(doc, dict) or set(doc) != {"a", "b"}:
        raise ValueError(f"{where}: a GEMM recipe is an object with the keys 'a' and 'b'")
    a, b = _operand(doc["a"], f"{where}.a"), _operand(doc["b"], f"{where}.b")
    try:
        return GemmRecipe(a, b)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _operand(doc, where: str) -> OperandRecipe:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: an operand recipe is an object of {list(_OPERAND_FIELDS)}")
    unknown = sorted(set(doc) - set(_OPERAND_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown operand fields {unknown}; use {list(_OPERAND_FIELDS)}")
    kw = dict(doc)
    block = kw.get("block")
    if block is not None:
        if not isinstance(block, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
            raise ValueError(f"{where}.block: expected two integers, got {block!r}")
        kw["block"] = tuple(block)
    for key in ("pow2_scale",):
        if key in kw and not isinstance(kw[key], bool):
            raise ValueError(f"{where}.{key}: expected true or false, got {kw[key]!r}")
    if "history_len" in kw and (isinstance(kw["history_len"], bool) or not isinstance(kw["history_len"], int)):
        raise ValueError(f"{where}.history_len: expected an integer, got {kw['history_len']!r}")
    try:
        return OperandRecipe(**kw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def needs_fields(recipe: Recipe) -> bool:
    """Whether ``recipe`` is not what its name resolves to (hand-built, or a name with overrides)."""
    try:
        return as_recipe(recipe.name) != recipe
    except ValueError:
        return True


def recipe_key(recipe: Recipe) -> str:
    """A string naming exactly ``recipe``'s fields (e.g. for a cache): its name when that says it all."""
    return json.dumps(recipe_to_dict(recipe), sort_keys=True) if needs_fields(recipe) else recipe.name


def resolve_recipe(name: str, defined: dict) -> Recipe:
    """The recipe called ``name``: from ``defined`` (name -> Recipe, read from a file), else by name."""
    if name in defined:
        return defined[name]
    try:
        return as_recipe(name)
    except ValueError:
        raise ValueError(f"recipe {name!r} is neither a named loka recipe nor defined in the file's 'recipes'; "
                         "probe and plan it with this loka version, which records hand-built recipes") from None
