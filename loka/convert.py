"""``loka.convert``: swap a model's Linear sites for ``Float8Linear``.

With a recipe this is the naive "convert every Linear" baseline that torchao
and Transformer Engine offer (optionally narrowed by ``module_filter_fn``);
with a plan (``loka.dispatch.apply_plan``, one layer up) each site gets its
planned kernels through the same swap. Either way the swap reuses the
original Parameters, walks the tree post-order, and reports every site it
did not convert with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

from loka.nn import Fallback, Float8Linear, resolve_kernels
from loka.recipe import GEMMS, Recipe, as_recipe

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConvertResult:
    """What ``convert`` did: converted fqns, and skipped fqns with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{fqn:<48} converted" for fqn in self.converted]
        rows += [f"{fqn:<48} skipped: {why}" for fqn, why in self.skipped.items()]
        return "\n".join(rows)


def _static_dims(linear: nn.Linear) -> dict[str, tuple[int | None, int]]:
    """(K, N) of each GEMM known before run time; wgrad's K is the batch size, seen only then."""
    k, n = linear.in_features, linear.out_features
    return {"fprop": (k, n), "dgrad": (n, k), "wgrad": (None, k)}


def _shape_problem(recipe: Recipe, kernels, linear: nn.Linear) -> str | None:
    for gemm in GEMMS:
        kernel = kernels[gemm]
        if kernel.hp:
            continue
        k, n = _static_dims(linear)[gemm]
        probe_k = 16 if k is None else k
        ok, why = kernel.supports(recipe.gemm(gemm), (16, probe_k, n), linear.weight.dtype, linear.weight.device)
        if not ok:
            return f"{gemm} on {kernel.name}: {why}"
    return None


def convert(
    model: nn.Module,
    recipe: Recipe | str | None = "tensorwise",
    *,
    module_filter_fn: FilterFn | None = None,
    kernels: str | Mapping[str, str] = "auto",
    fallback: Fallback | None = None,
) -> ConvertResult:
    """Swap Linear sites for Float8Linear in place; returns what was converted and skipped.

    ``module_filter_fn(module, fqn) -> bool`` chooses sites (all Linears by
    default). Sites whose dims a chosen kernel cannot take are skipped with the
    reason, unless ``fallback="hp"``, which converts them and runs those GEMMs
    in hp. A plan is applied one layer up, by ``loka.dispatch.apply_plan``
    (``loka.convert(model, plan)`` routes there).
    """
    if is_plan(recipe):
        raise TypeError("loka.convert.convert takes a recipe; apply a plan with loka.dispatch.apply_plan(model, plan) "
                        "or loka.convert(model, plan=plan)")
    fallback = fallback or "error"
    recipe = as_recipe(recipe)
    result = ConvertResult()
    for fqn, module, parent, child_name in _linears_post_order(model):
        if isinstance(module, Float8Linear):
            result.skipped[fqn] = "already a Float8Linear"
            continue
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            result.skipped[fqn] = "excluded by module_filter_fn"
            continue
        site_recipe, site_kernels = resolve_kernels(recipe, kernels, module.weight.device)
        problem = _shape_problem(site_recipe, site_kernels, module)
        if problem and fallback == "error":
            result.skipped[fqn] = problem
            continue
        new = Float8Linear.from_linear(module, recipe=recipe, kernels=kernels, fallback=fallback)
        setattr(parent, child_name, new)
        result.converted.append(fqn)
    return result


def is_plan(obj) -> bool:
    """A Plan object, or a path to a plan JSON file (recipe names never end in .json)."""

    if isinstance(obj, Path) or (isinstance(obj, str) and obj.endswith(".json")):
        return True
    return type(obj).__name__ == "Plan" and hasattr(obj, "sites")


def _linears_post_order(model: nn.Module):
    """(fqn, linear, parent, attribute name) for every nn.Linear, children before parents."""
    found = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            walk(child, fqn)
            if isinstance(child, nn.Linear):
                found.append((fqn, child, module, name))

    if isinstance(model, nn.Linear):
        raise ValueError("convert needs a model that contains Linears, not a bare Linear; use Float8Linear.from_linear")
    walk(model, "")
    return found




__all__ = ["ConvertResult", "convert"]
