"""loka: FP8 that pays off on recommendation models.

probe -> plan -> convert (then train / serve / gate). This module is the facade: the
dozen names of that workflow, whatever layer defines them (docs/architecture.md).

It sits on top of every layer yet is executed first whenever any ``loka.*`` module is
imported, so it binds only the core names eagerly (formats, recipes, quantize,
Float8Linear, convert) and resolves the upper ones (``Probe``, ``plan``, ``gate``, ...)
on first access through :func:`__getattr__`. ``import loka`` therefore loads the core
alone, and no core module ever needs an upper one. ``loka.gate`` is the package
``loka.gate``, callable as ``loka.gate(baseline, candidate, ...)``.
"""

import importlib

from loka import convert as _convert_module
from loka.nn import Float8Linear
from loka.quantize import dequantize, quantize
from loka.recipe import Recipe

__version__ = "0.1.0"

# Upper-layer names of the workflow: name -> (module, attribute), imported on first use.
_LAZY = {
    "Probe": ("loka.probe", "Probe"),
    "ProbeConfig": ("loka.probe", "ProbeConfig"),
    "plan": ("loka.dispatch", "plan"),
    "Budget": ("loka.dispatch", "Budget"),
    "apply_plan": ("loka.dispatch", "apply_plan"),
    "apply_mods": ("loka.mods", "apply_all"),
    "EvalOutputs": ("loka.gate", "EvalOutputs"),
}


def __getattr__(name: str):
    if name == "gate":  # the package itself, callable (see loka/gate/__init__.py)
        return importlib.import_module("loka.gate")
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loka' has no attribute {name!r}")


def convert(model, recipe="tensorwise", *, plan=None, **options):
    """Put every GEMM on a parameter of ``model`` in FP8, by a recipe or by a plan.

    ``loka.convert(model, "rowwise")``: Linears become ``Float8Linear``; every other parameter
    GEMM (``F.linear``, ``x @ W``, ``tensordot``, ``einsum``, 3-D stacks, MHA, 1x1 convolutions)
    is taken at the ATen level (``module_filter_fn``, ``kernels``, ``fallback``, ``example``;
    see :func:`loka.convert.convert`). ``loka.convert(model,
    plan)`` or ``plan=``: a ``loka.dispatch.Plan`` or a plan JSON path, applied by
    ``loka.dispatch.apply_plan`` (``fallback`` defaults to ``"hp"``, other options go there).
    Returns a ``ConvertResult``: sites seen running in FP8 (verified on one step), the rest with the reason.
    """
    if plan is None and _convert_module.is_plan(recipe):
        plan, recipe = recipe, None
    if plan is None:
        return _convert_module.convert(model, recipe, **options)
    if options.get("module_filter_fn") is not None or options.get("kernels", "auto") != "auto":
        raise ValueError("with a plan, kernels and sites come from the plan; drop module_filter_fn and kernels")
    options.pop("module_filter_fn", None)
    options.pop("kernels", None)
    if options.get("fallback") is None:
        options.pop("fallback", None)
    return __getattr__("apply_plan")(model, plan, **options)


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"gate"})


__all__ = [
    "Budget",
    "EvalOutputs",
    "Float8Linear",
    "Probe",
    "ProbeConfig",
    "Recipe",
    "apply_mods",
    "convert",
    "dequantize",
    "gate",
    "plan",
    "quantize",
]
