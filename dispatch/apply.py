"""``apply_plan``: swap a model's Linear sites for ``Float8Linear`` with the planned kernels.

Planned sites that are not Linear modules (a 1x1 convolution, named by its module; any
other parameter, named by its fqn, whatever GEMM form the model writes with it) get a
``loka.param_gemms.ParamEngine`` with the planned kernels; a parameter the plan does not
mention is left as it is. The result is verified like ``loka.convert``'s: a site is
converted once its GEMMs were seen running in FP8 (``example=``, or the first forward).

Before touching the model the plan is matched against it, and *every*
difference is collected: a planned site missing from the model, a Linear of the
model the plan does not mention, a shape that differs from the planned one, a
kernel that is unknown or unavailable on this machine, or that does not take
the planned recipe at the site's shape. With ``on_mismatch="error"`` (default)
any difference raises :class:`PlanMismatchError` listing them all; with
``on_mismatch="bf16"`` each mismatching site is left as it is (hp) and listed
in ``ConvertResult.skipped`` with its reason, and the rest is converted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from loka.aten_gemms import param_sites
from loka.convert import ConvertResult, linears_post_order, attach_param_gemms, parameter_sites, verify
from loka.devices import Target, detect_target, get_target, plan_target_problem
from loka.dispatch.plans import Plan, PlanError, SitePlan, load_plan
from loka.kernels import KERNELS
from loka.nn import Float8Linear
from loka.param_gemms import ParamEngine
from loka.recipe import GEMMS, gemm_shape


class PlanMismatchError(PlanError):
    """The plan does not match the model or this machine; ``differences`` lists every one."""

    def __init__(self, differences: list[str]) -> None:
        self.differences = differences
        lines = "\n  - ".join(differences)
        super().__init__(
            f"the plan does not match this model/machine ({len(differences)} differences):\n  - {lines}\n"
            "re-plan for this model and machine, or pass on_mismatch='bf16' to keep those sites in bf16"
        )

    def summary(self) -> str:
        """The message in one line: the count, the first difference, and the fix."""
        more = f" (and {len(self.differences) - 1} more)" if len(self.differences) > 1 else ""
        return (f"the plan does not match this model/machine: {self.differences[0]}{more}; re-plan for this "
                "model and machine (loka plan), or keep the mismatched sites in bf16 (on_mismatch='bf16')")


def _features(module) -> tuple[int, int] | None:
    """(K, N) of a Linear or a 1x1 conv; None for a parameter site (its GEMMs' K and N depend on the
    view the model's code takes of it: ``x @ W``, ``einsum("bk,nk->bn")``, ``W[i]``)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Parameter):
        return None
    return module.in_features, module.out_features


def _weight(site) -> torch.Tensor:
    return site if isinstance(site, nn.Parameter) else site.weight


def base_site(fqn: str) -> str:
    """The parameter site of a probe key: ``"W#1"`` (W's second GEMM in a forward) is ``W``'s."""
    return fqn.split("#", 1)[0]


def _param_site_objects(model: nn.Module) -> dict[str, object]:
    """Every parameter GEMM site that is not a Linear: a conv module, or the parameter itself."""
    owners = {id(p): mod for mod in model.modules() for p in mod.parameters(recurse=False)}
    linears = {fqn for fqn, *_ in linears_post_order(model)}
    out = {}
    for site, p in param_sites(model).values():
        mod = owners[id(p)]
        if site in linears or isinstance(mod, (Float8Linear, nn.Embedding, nn.EmbeddingBag)) or site in out:
            continue
        out[site] = mod if isinstance(mod, nn.modules.conv._ConvNd) else p
    return out


def _site_problems(sp: SitePlan, linear: nn.Module, device: torch.device) -> list[str]:
    problems = []
    k, n = _features(linear) or (sp.in_features, sp.out_features)
    if (k, n) != (sp.in_features, sp.out_features):
        problems.append(
            f"{sp.fqn}: shape mismatch, plan has in={sp.in_features} out={sp.out_features}, model has in={k} out={n}"
        )
        return problems
    for gemm in GEMMS:
        choice = sp.gemms[gemm]
        if not choice.is_fp8:
            continue
        if choice.kernel not in KERNELS:
            problems.append(f"{sp.fqn}: {gemm} kernel {choice.kernel!r} is not registered here")
            continue
        kernel = KERNELS.get(choice.kernel)
        if gemm not in kernel.gemms:
            problems.append(f"{sp.fqn}: kernel {choice.kernel!r} does not implement {gemm}")
            continue
        ok, why = kernel.available(device)
        if not ok:
            problems.append(f"{sp.fqn}: {gemm} kernel {choice.kernel!r} is not available here: {why}")
            continue
        shape = gemm_shape(gemm, max(sp.m, 1), sp.in_features, sp.out_features)
        ok, why = kernel.supports(choice.gemm_recipe(gemm), shape, _weight(linear).dtype, device)
        if not ok:
            problems.append(f"{sp.fqn}: {gemm} kernel {choice.kernel!r} does not take {choice.recipe} at "
                            f"[M={shape[0]}, K={shape[1]}, N={shape[2]}]: {why}")
    return problems


def plan_differences(model: nn.Module, plan: Plan) -> dict[str, list[str]]:
    """Every difference between ``plan`` and ``model`` on this machine, grouped by fqn."""
    # loka.convert / loka.nn import loka.dispatch, so they are imported here, not at the top.

    linears = {fqn: mod for fqn, mod, _, _ in linears_post_order(model)}
    planned = {s.fqn: s for s in plan.sites}
    objs = _param_site_objects(model)
    convs = {s: objs[base_site(s)] for s in planned if base_site(s) in objs}
    out: dict[str, list[str]] = {}
    for fqn in sorted(set(planned) - set(linears) - set(convs)):
        out[fqn] = [f"{fqn}: in the plan but not a Linear, convolution or parameter of the model"]
    for fqn in sorted(set(linears) - set(planned)):
        if not isinstance(linears[fqn], Float8Linear):
            out[fqn] = [f"{fqn}: a Linear of the model that the plan does not cover"]
    linears = {**linears, **convs}
    for fqn in sorted(set(planned) & set(linears)):
        problems = _site_problems(planned[fqn], linears[fqn], _weight(linears[fqn]).device)
        if problems:
            out[fqn] = problems
    return out


def apply_plan(
    model: nn.Module,
    plan: Plan | str | Path,
    *,
    on_mismatch: str = "error",
    fallback: str = "hp",
    compile: bool | None = None,
    target: Target | str | None = None,
    example=None,
    verify_run: bool = True,
) -> ConvertResult:
    """Apply ``plan`` (a Plan or a plan JSON path) to ``model`` in place.

    ``target``: the GPU the model will run on (``"h100"``, a loka.devices.Target; default: the
    model's device, detected). A plan made for another architecture (a B200 plan on an H100) is
    refused with one :class:`PlanError` line naming both; plans without a recorded target apply.
    ``on_mismatch``: ``"error"`` raises :class:`PlanMismatchError` listing every difference;
    ``"bf16"`` keeps mismatching sites as they are. ``fallback`` is passed to Float8Linear:
    ``"hp"`` (default) runs a GEMM in hp when a run-time shape (e.g. a ragged last batch)
    does not suit its kernel and records it in ``module.fallbacks``; ``"error"`` raises.
    ``compile``: whether the caller runs the model under torch.compile; ``False`` with
    ``compiled_cast`` sites in the plan warns once, naming them (their casts then run as
    passes of their own, which the plan did not count). ``None``: not said, no warning.
    ``example``: inputs to verify the result on now (else the model's first forward is observed).
    """

    if on_mismatch not in ("error", "bf16"):
        raise ValueError(f"on_mismatch={on_mismatch!r} is not valid; use 'error' or 'bf16'")
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    wrong_device = plan_target_problem(plan.device, _target_of(model, target))
    if wrong_device:
        raise PlanError(wrong_device)
    if compile is False:
        warn_uncompiled_casts(plan)
    diffs = plan_differences(model, plan)
    if diffs and on_mismatch == "error":
        raise PlanMismatchError([p for fqn in sorted(diffs) for p in diffs[fqn]])
    planned = {s.fqn: s for s in plan.sites}
    result = ConvertResult()
    sites = linears_post_order(model)
    for fqn, module, parent, child_name in sites:
        sp = planned.get(fqn)
        if fqn in diffs:
            result.skipped[fqn] = "kept bf16 (plan mismatch): " + "; ".join(d.split(": ", 1)[1] for d in diffs[fqn])
            continue
        if isinstance(module, Float8Linear):
            result.skipped[fqn] = f"already a {type(module).__name__}"
            continue
        if sp is None:
            continue
        if not sp.is_fp8:
            result.skipped[fqn] = "plan keeps bf16: " + sp.summary_reason()
            continue
        new = Float8Linear.from_linear(module, recipe=sp.recipe(), kernels=sp.kernels(), fallback=fallback)
        new.loka_site = fqn
        setattr(parent, child_name, new)
        result.converted.append(fqn)
        hp = {g: f"plan keeps hp: {c.reason}" for g, c in sp.gemms.items() if not c.is_fp8}
        if hp:
            result.hp_gemms[fqn] = hp
    _apply_params(model, planned, diffs, fallback, result)
    done = set(result.converted) | set(result.skipped)
    for fqn in sorted(set(planned) - {f for f, *_ in sites} - done):
        if base_site(fqn) not in done:
            result.skipped.setdefault(fqn, diffs.get(fqn, ["not in the model"])[0])
    if verify_run:  # False: see loka.convert.convert
        verify(result, model, example)
    return result


def _target_of(model: nn.Module, target: Target | str | None) -> Target | None:
    if isinstance(target, str):
        return get_target(target)
    if target is not None:
        return target
    param = next(model.parameters(), None)
    return detect_target(param.device) if param is not None else None


def warn_uncompiled_casts(plan: Plan) -> list[str]:
    """Warn once (one warning naming every site) when ``compiled_cast`` sites will run without torch.compile."""
    sites = [s.fqn for s in plan.sites if s.producer == "compiled_cast"]
    if sites:
        warnings.warn(f"the plan's compiled_cast sites {sites} rely on torch.compile fusing their FP8 casts into the "
                      "producing ops; run without it, each pays a separate cast pass the plan did not count. "
                      "Compile the model (compile=True / --compile) or re-plan without compiled casts.",
                      UserWarning, stacklevel=3)
    return sites


def _apply_params(model, planned, diffs, fallback, result) -> None:
    """Planned parameter sites (convolutions, any parameter a GEMM uses): a ParamEngine each."""
    engines = {}
    for site, _, param in parameter_sites(model, result):
        # one engine per parameter: its first GEMM's plan (the probe keys further GEMMs "site#i")
        keys = sorted((k for k in planned if base_site(k) == site), key=lambda k: (k != site, k))
        if not keys:
            continue
        sp = planned[keys[0]]
        bad = [d for k in keys for d in diffs.get(k, [])]
        if bad:
            result.skipped[site] = "kept bf16 (plan mismatch): " + "; ".join(d.split(": ", 1)[1] for d in bad)
        elif not sp.is_fp8:
            result.skipped[site] = "plan keeps bf16: " + sp.summary_reason()
        else:
            engines[site] = ParamEngine(site, param, sp.recipe(), sp.kernels(), fallback)
            result.converted.append(site)
            hp = {g: f"plan keeps hp: {c.reason}" for g, c in sp.gemms.items() if not c.is_fp8}
            if hp:
                result.hp_gemms[site] = hp
    attach_param_gemms(model, engines)
