"""``loka.convert``: FP8 for every GEMM on a parameter, and a report of what really ran in FP8.

Linear modules become ``Float8Linear`` (the fast path: one module, its FP8 weight cached);
every other parameter whose GEMMs the model writes in its own code (``F.linear``,
``x @ W``, ``torch.matmul(self.kernels[i], x)``, ``tensordot``, ``einsum``, 1x1
convolutions, ``nn.MultiheadAttention``) gets a :class:`~loka.param_gemms.ParamEngine` that
takes those GEMMs at the ATen level. With a recipe this is "convert everything" (narrowed
by ``module_filter_fn``); with a plan (``loka.dispatch.apply_plan``, one layer up) each
site gets its planned kernels. Parameters are reused, never copied.

The result is checked on one observed step (``loka.convert_verify``): a site is reported
converted only when its GEMMs were seen running in FP8; anything else is named with the
reason, never counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

from loka.aten_gemms import param_sites
from loka.convert_verify import gemm_counts, verify_now, verify_on_first_forward
from loka.nn import Fallback, Float8Linear, resolve_kernels
from loka.param_gemms import ParamEngine, ParamGemms
from loka.recipe import GEMMS, Recipe, as_recipe

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConvertResult:
    """What ``convert`` did, counted by GEMM: a site is converted only if one of its GEMMs runs in FP8.

    ``converted``: fqns with at least one GEMM in FP8. ``hp_gemms[fqn]``: for a converted
    site, each GEMM that still runs in hp and why (a kernel that cannot take the shape,
    or a plan/kernel choice that keeps it hp); absent when all three run in FP8.
    ``skipped``: fqns left as they were, with the reason.
    """

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    hp_gemms: dict[str, dict[str, str]] = field(default_factory=dict)
    verified: bool = False  # True once a step was observed (see loka.convert_verify)
    counts: dict[str, dict] = field(default_factory=dict)  # site -> GEMMs expected / run in FP8 / in hp

    def fp8_gemms(self, fqn: str) -> list[str]:
        """The GEMMs of ``fqn`` that run in FP8 (empty for a site that was not converted)."""
        if fqn not in self.converted:
            return []
        return [g for g in GEMMS if g not in self.hp_gemms.get(fqn, {})]

    def observed(self, model: nn.Module) -> dict[str, dict[str, str]]:
        """``hp_gemms`` plus the GEMMs that fell back to hp at run time, per converted site.

        A kernel can refuse a shape seen only while running (wgrad's K is the batch size);
        with ``fallback="hp"`` the module records it in ``fallbacks``. Call after training
        steps to know which GEMMs really ran in FP8.
        """
        out = {fqn: dict(gemms) for fqn, gemms in self.hp_gemms.items()}
        for fqn in self.converted:
            try:
                ran_hp = getattr(model.get_submodule(fqn), "fallbacks", {})
            except AttributeError:
                continue  # a parameter site: its engine's counts are in gemm_counts
            for gemm, why in ran_hp.items():
                out.setdefault(fqn, {}).setdefault(gemm, f"fell back at run time: {why}")
        return out

    @property
    def n_fp8_gemms(self) -> int:
        return sum(len(self.fp8_gemms(fqn)) for fqn in self.converted)

    def table(self) -> str:
        rows = [] if self.verified else ["(not verified yet: checked on the model's first forward, or pass example=)"]
        for fqn in self.converted:
            hp = self.hp_gemms.get(fqn, {})
            if not hp:
                rows.append(f"{fqn:<48} converted (fprop, dgrad, wgrad in FP8)")
                continue
            why = "; ".join(f"{g} in hp: {r}" for g, r in hp.items())
            rows.append(f"{fqn:<48} partly converted ({', '.join(self.fp8_gemms(fqn))} in FP8; {why})")
        rows += [f"{fqn:<48} skipped: {why}" for fqn, why in self.skipped.items()]
        return "\n".join(rows)


def _static_dims(linear: nn.Linear) -> dict[str, tuple[int | None, int]]:
    """(K, N) of each GEMM known before run time; wgrad's K is the batch size, seen only then."""
    k, n = linear.in_features, linear.out_features
    return {"fprop": (k, n), "dgrad": (n, k), "wgrad": (None, k)}


def _hp_gemms(recipe: Recipe, kernels, linear: nn.Linear) -> tuple[dict[str, str], str | None]:
    """``{gemm: why it would run in hp}`` for a site, and the first shape problem among them (or None)."""
    out, first_problem = {}, None
    for gemm in GEMMS:
        kernel = kernels[gemm]
        if kernel.hp:
            out[gemm] = f"kernel {kernel.name!r} chosen for it"
            continue
        k, n = _static_dims(linear)[gemm]
        probe_k = 16 if k is None else k
        ok, why = kernel.supports(recipe.gemm(gemm), (16, probe_k, n), linear.weight.dtype, linear.weight.device)
        if not ok:
            out[gemm] = f"{kernel.name}: {why}"
            first_problem = first_problem or f"{gemm} on {out[gemm]}"
    return out, first_problem


def convert(
    model: nn.Module,
    recipe: Recipe | str | None = "tensorwise",
    *,
    module_filter_fn: FilterFn | None = None,
    kernels: str | Mapping[str, str] = "auto",
    fallback: Fallback | None = None,
    example=None,
    verify_run: bool = True,
) -> ConvertResult:
    """Put every GEMM on a parameter of ``model`` in FP8, in place; returns what ran converted and what not.

    ``module_filter_fn(module, fqn) -> bool`` chooses sites (a parameter site passes its
    owning module and its name). Linear sites whose dims a chosen kernel cannot take are
    skipped with the reason, unless ``fallback="hp"``, which converts them and runs those
    GEMMs in hp; parameter sites always fall back per GEMM and say why. ``example``
    (inputs, a tensor or a tuple) verifies on one forward and backward now; without it the
    model's first forward is observed (``ConvertResult.verified``); ``verify_run=False`` observes
    nothing (a resumed run, verified when it started: an observed step runs under a dispatch mode,
    and the resumed step must round as the uninterrupted run's did). A plan is applied one
    layer up, by ``loka.dispatch.apply_plan`` (``loka.convert(model, plan)`` routes there).
    """
    if is_plan(recipe):
        raise TypeError("loka.convert.convert takes a recipe; apply a plan with loka.dispatch.apply_plan(model, plan) "
                        "or loka.convert(model, plan=plan)")
    fallback = fallback or "error"
    recipe = as_recipe(recipe)
    result = ConvertResult()
    for fqn, module, parent, child_name in linears_post_order(model):
        if isinstance(module, Float8Linear):
            result.skipped[fqn] = "already a Float8Linear"
            continue
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            result.skipped[fqn] = "excluded by module_filter_fn"
            continue
        site_recipe, site_kernels = resolve_kernels(recipe, kernels, module.weight.device)
        hp, shape_problem = _hp_gemms(site_recipe, site_kernels, module)
        if shape_problem and fallback == "error":
            result.skipped[fqn] = shape_problem
            continue
        if len(hp) == len(GEMMS):
            result.skipped[fqn] = "no GEMM would run in FP8: " + "; ".join(f"{g}: {w}" for g, w in hp.items())
            continue
        new = Float8Linear.from_linear(module, recipe=recipe, kernels=kernels, fallback=fallback)
        new.loka_site = fqn
        setattr(parent, child_name, new)
        result.converted.append(fqn)
        if hp:
            result.hp_gemms[fqn] = hp
    engines = {}
    for site, module, param in parameter_sites(model, result):
        if module_filter_fn is not None and not module_filter_fn(module, site):
            result.skipped[site] = "excluded by module_filter_fn"
            continue
        engines[site] = ParamEngine(site, param, recipe, kernels, "hp" if fallback == "error" else fallback)
        result.converted.append(site)
        hp = {g: f"kernel {k.name!r} chosen for it" for g, k in engines[site].kernels.items() if k.hp}
        if hp:
            result.hp_gemms[site] = hp
    attach_param_gemms(model, engines)
    if verify_run:
        verify(result, model, example)
    return result


def verify(result: ConvertResult, model: nn.Module, example=None) -> None:
    """Check ``result`` against what runs: now on ``example``, else on the model's first forward."""
    if example is not None:
        verify_now(result, model, example)
    else:
        verify_on_first_forward(result, model)


def parameter_sites(model: nn.Module, result: ConvertResult):
    """``(site, owning module, parameter)`` for every parameter GEMM site that is not a module already
    converted: any floating parameter of 2+ dims except Float8Linear weights, embedding tables and
    convolutions that are not 1x1 (those are named in ``result.skipped``)."""
    owners = {id(p): mod for mod in model.modules() for p in mod.parameters(recurse=False)}
    for full, (site, param) in param_sites(model).items():
        mod = owners[id(param)]
        if isinstance(mod, (Float8Linear, ParamGemms)) or site in result.converted or site in result.skipped:
            continue
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            continue  # a lookup, not a GEMM
        if isinstance(mod, nn.modules.conv._ConvNd) and full.endswith("weight"):
            why = _conv_problem(mod)
            if why:
                result.skipped[site] = f"not converted: {why}"
                continue
        yield site, mod, param


def _conv_problem(conv) -> str | None:
    if any(k != 1 for k in conv.kernel_size):
        return f"convolution kernel {tuple(conv.kernel_size)} is wider than 1x1 (not a plain GEMM)"
    if conv.groups != 1 or any(s != 1 for s in conv.stride) or conv.padding not in ("valid",) and any(conv.padding):
        return f"1x1 convolution with stride {conv.stride}, padding {conv.padding}, groups {conv.groups} (need 1, 0, 1)"
    return None


def attach_param_gemms(model: nn.Module, engines: dict[str, ParamEngine]) -> None:
    """Route the GEMMs of ``engines``' parameters through them during ``model``'s forwards.

    The router is kept as ``model.loka_param_gemms``, a plain attribute, not a submodule: a
    ``Sequential`` or ``ModuleList`` would call or iterate a child, and ``state_dict`` must not
    change. Engines move their scale state to the parameter's device when they run.
    """
    if not engines:
        return
    router = getattr(model, "loka_param_gemms", None)
    if router is not None:
        router.add(engines)
        return
    router = ParamGemms(engines)
    object.__setattr__(model, "loka_param_gemms", router)
    router.attach(model)


def param_engines(model: nn.Module) -> dict[str, ParamEngine]:
    """``{site: ParamEngine}`` of the parameter sites ``convert``/``apply_plan`` attached to ``model``."""
    router = getattr(model, "loka_param_gemms", None)
    return {} if router is None else dict(router.engines)


def is_plan(obj) -> bool:
    """A Plan object, or a path to a plan JSON file (recipe names never end in .json)."""

    if isinstance(obj, Path) or (isinstance(obj, str) and obj.endswith(".json")):
        return True
    return type(obj).__name__ == "Plan" and hasattr(obj, "sites")


def linears_post_order(model: nn.Module):
    """(fqn, linear, parent, attribute name) for every nn.Linear the model calls, children before parents."""
    found = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            walk(child, fqn)
            # MultiheadAttention passes out_proj's weight to its functional form and never calls
            # out_proj: that weight is a parameter site (loka.param_gemms), not a Linear to swap.
            if isinstance(child, nn.Linear) and not isinstance(module, nn.MultiheadAttention):
                found.append((fqn, child, module, name))

    if isinstance(model, nn.Linear):
        raise ValueError("convert needs a model that contains Linears, not a bare Linear; use Float8Linear.from_linear")
    walk(model, "")
    return found




__all__ = ["ConvertResult", "attach_param_gemms", "convert", "gemm_counts", "param_engines", "verify"]
