"""loka: FP8 that pays off on recommendation models.

probe -> plan -> convert (then train / serve / gate). This module is the facade: the
dozen names of that workflow, whatever layer defines them (docs/architecture.md).

It sits on top of every layer yet is executed first whenever any ``loka.*`` module is
imported, so it binds only the core names eagerly (formats, recipes, quantize,
Float8Linear, convert) and resolves the upper ones (``Probe``, ``plan``, ``gate``, ...)
on first access through :func:`__getattr__`. ``import loka`` therefore loads the core
alone, and no core module ever needs an upper one. The upper packages are attributes
too (``loka.mods``, ``loka.probe``, ``loka.dispatch``, ``loka.models``, ``loka.gate``),
imported on first access.

``loka.quantize``, ``loka.convert`` and ``loka.gate`` are the modules themselves, callable
as their main function (``loka.quantize(x, "e4m3")``, ``loka.convert(model, plan)``,
``loka.gate(baseline, candidate)``), so ``loka.quantize.fake_quantize`` works as well.
"""

import importlib

from loka import convert as _convert_module
from loka import quantize  # the module, callable as its quantize function (loka.callable_module)
from loka.callable_module import make_callable
from loka.nn import Float8Linear
from loka.quantize import dequantize
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
# Upper-layer packages, reachable as attributes (``loka.mods.MODS``) without importing them first.
_SUBPACKAGES = ("probe", "mods", "dispatch", "models", "gate")


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # loka.gate is the package itself, callable (see gate/__init__.py)
        return importlib.import_module(f"loka.{name}")
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loka' has no attribute {name!r}")


def _convert(model, recipe="tensorwise", *, plan=None, **options):
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


# ``loka.convert`` is the module ``loka.convert`` (``loka.convert.ConvertResult``), callable as the
# function above, which also routes a plan to loka.dispatch.apply_plan.
convert = make_callable("loka.convert", _convert)


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


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
