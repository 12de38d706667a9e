"""``apply_plan``: swap a model's Linear sites for ``Float8Linear`` with the planned kernels.

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

from pathlib import Path

import torch
from torch import nn

from loka.convert import ConvertResult, _linears_post_order
from loka.dispatch.plans import Plan, PlanError, SitePlan, load_plan
from loka.kernels import KERNELS
from loka.nn import Float8Linear
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


def _site_problems(sp: SitePlan, linear: nn.Linear, device: torch.device) -> list[str]:
    problems = []
    if (linear.in_features, linear.out_features) != (sp.in_features, sp.out_features):
        problems.append(
            f"{sp.fqn}: shape mismatch, plan has in={sp.in_features} out={sp.out_features}, model has "
            f"in={linear.in_features} out={linear.out_features}"
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
        ok, why = kernel.supports(choice.gemm_recipe(gemm), shape, linear.weight.dtype, device)
        if not ok:
            problems.append(f"{sp.fqn}: {gemm} kernel {choice.kernel!r} does not take {choice.recipe} at "
                            f"[M={shape[0]}, K={shape[1]}, N={shape[2]}]: {why}")
    return problems


def plan_differences(model: nn.Module, plan: Plan) -> dict[str, list[str]]:
    """Every difference between ``plan`` and ``model`` on this machine, grouped by fqn."""
    # loka.convert / loka.nn import loka.dispatch, so they are imported here, not at the top.

    linears = {fqn: mod for fqn, mod, _, _ in _linears_post_order(model)}
    planned = {s.fqn: s for s in plan.sites}
    out: dict[str, list[str]] = {}
    for fqn in sorted(set(planned) - set(linears)):
        out[fqn] = [f"{fqn}: in the plan but not a Linear of the model"]
    for fqn in sorted(set(linears) - set(planned)):
        if not isinstance(linears[fqn], Float8Linear):
            out[fqn] = [f"{fqn}: a Linear of the model that the plan does not cover"]
    for fqn in sorted(set(planned) & set(linears)):
        problems = _site_problems(planned[fqn], linears[fqn], linears[fqn].weight.device)
        if problems:
            out[fqn] = problems
    return out


def apply_plan(
    model: nn.Module,
    plan: Plan | str | Path,
    *,
    on_mismatch: str = "error",
    fallback: str = "hp",
) -> ConvertResult:
    """Apply ``plan`` (a Plan or a plan JSON path) to ``model`` in place.

    ``on_mismatch``: ``"error"`` raises :class:`PlanMismatchError` listing every difference;
    ``"bf16"`` keeps mismatching sites as they are. ``fallback`` is passed to Float8Linear:
    ``"hp"`` (default) runs a GEMM in hp when a run-time shape (e.g. a ragged last batch)
    does not suit its kernel and records it in ``module.fallbacks``; ``"error"`` raises.
    """

    if on_mismatch not in ("error", "bf16"):
        raise ValueError(f"on_mismatch={on_mismatch!r} is not valid; use 'error' or 'bf16'")
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    diffs = plan_differences(model, plan)
    if diffs and on_mismatch == "error":
        raise PlanMismatchError([p for fqn in sorted(diffs) for p in diffs[fqn]])
    planned = {s.fqn: s for s in plan.sites}
    result = ConvertResult()
    for fqn, module, parent, child_name in _linears_post_order(model):
        sp = planned.get(fqn)
        if fqn in diffs:
            result.skipped[fqn] = "kept bf16 (plan mismatch): " + "; ".join(d.split(": ", 1)[1] for d in diffs[fqn])
            continue
        if isinstance(module, Float8Linear):
            result.skipped[fqn] = "already a Float8Linear"
            continue
        if sp is None:
            continue
        if not sp.is_fp8:
            result.skipped[fqn] = "plan keeps bf16: " + sp.summary_reason()
            continue
        new = Float8Linear.from_linear(module, recipe=sp.recipe(), kernels=sp.kernels(), fallback=fallback)
        setattr(parent, child_name, new)
        result.converted.append(fqn)
    for fqn in sorted(set(planned) - {f for f, *_ in _linears_post_order(model)}):
        result.skipped.setdefault(fqn, diffs.get(fqn, ["not in the model"])[0])
    return result
