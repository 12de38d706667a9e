"""What ``loka.convert`` claims is what ran: the converted sites, checked on one observed step.

A site prepared for FP8 (a ``Float8Linear``, or a parameter whose GEMMs a ``ParamEngine``
takes) is only *converted* once its GEMMs are seen running in FP8. ``convert(...,
example=inputs)`` runs one forward and backward on ``inputs`` under a
:class:`~loka.aten_gemms.GemmObserver` (parameter gradients are put back as they were);
without ``example`` the model's own first forward is observed, and each site's backward
GEMMs are counted as they run (:func:`gemm_counts`). A site whose GEMMs did not
run in FP8 is named in a warning with the form its GEMMs reached (the ATen ops), and moved
to ``skipped`` with the reason; a parameter GEMM that no engine took is named the same way.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from loka.aten_gemms import NO_PARAM, GemmObserver, ParamIndex, param_sites
from loka.recipe import GEMMS


def _site_objects(model: nn.Module) -> dict[str, object]:
    """Every object that counts a site's GEMMs (Float8Linear modules and parameter engines), by site."""
    out = {}
    for fqn, mod in model.named_modules():
        if hasattr(mod, "ran") and hasattr(mod, "expected"):
            out[getattr(mod, "loka_site", None) or fqn] = mod
    router = getattr(model, "loka_param_gemms", None)
    out.update({} if router is None else router.engines)
    return out


def gemm_counts(model: nn.Module) -> dict[str, dict]:
    """Per prepared site: GEMMs expected from its forwards so far, and those run in FP8 and in hp."""
    return {site: {"expected": dict(obj.expected), "fp8_gemms_observed": {g: obj.ran[g]["fp8"] for g in GEMMS},
                   "hp_gemms_observed": {g: obj.ran[g]["hp"] for g in GEMMS},
                   "forms": sorted(getattr(obj, "forms", ()) or ["Float8Linear"])}
            for site, obj in _site_objects(model).items()}


def _why_hp(obj, gemm: str) -> str:
    return (getattr(obj, "why_hp", None) or getattr(obj, "fallbacks", {})).get(gemm, "ran in hp")


def finalize(result, model: nn.Module, observer: GemmObserver | None, backward: bool) -> None:
    """Revise ``result`` from what ran: sites that ran no FP8 GEMM leave ``converted``, each with a warning."""
    objs = _site_objects(model)
    result.counts = gemm_counts(model)
    for site in list(result.converted):
        obj = objs.get(site)
        if obj is None:
            continue
        gemms = GEMMS if backward else ("fprop",)
        short = [g for g in gemms if obj.ran[g]["fp8"] < obj.expected[g] and g not in result.hp_gemms.get(site, {})]
        form = ", ".join(result.counts[site]["forms"])
        seen = observer.counts.get(site) if observer is not None else None
        if obj.expected["fprop"] == 0 and seen is not None and seen.hp_flops:
            why = "; ".join(seen.why_not) or "; ".join(seen.why_hp)
            _demote(result, site, f"not converted: its GEMMs ran in hp ({', '.join(sorted(seen.forms))}): {why}")
        elif obj.expected["fprop"] == 0 and not hasattr(obj, "in_features"):
            result.converted.remove(site)  # a parameter no GEMM used (a bias, a scale): not a GEMM site
            result.hp_gemms.pop(site, None)
            result.skipped[site] = "not a GEMM operand in the verified step"
        elif obj.expected["fprop"] == 0:
            _demote(result, site, "not converted: none of its GEMMs ran in the verification step")
        elif short and all(obj.ran[g]["fp8"] == 0 for g in gemms if g not in result.hp_gemms.get(site, {})):
            _demote(result, site, f"not converted: {', '.join(short)} ran in hp ({form}): "
                                  + "; ".join(_why_hp(obj, g) for g in short))
        elif short:
            hp = result.hp_gemms.setdefault(site, {})
            for g in short:
                hp[g] = f"ran in hp at run time ({form}): {_why_hp(obj, g)}"
            warnings.warn(f"loka.convert: {site} ({form}): {', '.join(short)} ran in hp: "
                          + "; ".join(_why_hp(obj, g) for g in short), UserWarning, stacklevel=4)
    if observer is not None:
        for site, count in observer.counts.items():
            if site == NO_PARAM or site in result.converted or count.hp_flops == 0:
                continue
            if site not in result.skipped:
                why = "; ".join(count.why_hp) or "no loka engine took it"
                result.skipped[site] = f"not converted: its GEMMs ran in hp ({', '.join(sorted(count.forms))}): {why}"
    result.verified = True


def _demote(result, site: str, why: str) -> None:
    result.converted.remove(site)
    result.hp_gemms.pop(site, None)
    result.skipped[site] = why
    warnings.warn(f"loka.convert: {site} {why}", UserWarning, stacklevel=5)


def _observer(model: nn.Module) -> GemmObserver:
    return GemmObserver(ParamIndex({site: p for site, p in param_sites(model).values()}))


def verify_now(result, model: nn.Module, example) -> None:
    """One forward and backward of ``model(*example)`` (the sum of its floating outputs) under observation."""
    args = example if isinstance(example, tuple) else (example,)
    grads = {p: p.grad for p in model.parameters()}
    observer = _observer(model)
    try:
        with observer:
            out = model(*args)
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                    and t.is_floating_point() and t.requires_grad]
            if outs:
                sum(t.float().sum() for t in outs).backward()
    finally:
        for p, g in grads.items():
            p.grad = g
    finalize(result, model, observer, backward=bool(outs))


def verify_on_first_forward(result, model: nn.Module) -> None:
    """Observe the model's own first forward (fprop and hp GEMMs, finalized when it ends); at the next
    forward after a backward ran, check the backward GEMMs counted meanwhile (dgrad, wgrad)."""
    state = {"phase": "first"}

    def enter(module, args) -> None:
        if torch.compiler.is_compiling():
            return  # a traced forward runs no Python mode: verify on an eager step (example=) instead
        if state["phase"] == "first":
            state["observer"] = _observer(model)
            state["observer"].__enter__()
        elif state["phase"] == "backward" and _backward_ran(model):
            finalize(result, model, state.get("seen"), backward=True)
            state["phase"] = "done"

    def leave(module, args, out) -> None:
        observer = state.pop("observer", None)
        if observer is not None:
            observer.__exit__(None, None, None)
            finalize(result, model, observer, backward=False)
            state["phase"], state["seen"] = "backward", observer
        elif state["phase"] == "done":
            for h in handles:  # safe here: forward iterates the forward hooks, not the pre-hooks ...
                h.remove()  # ... and a dict mutated after its iteration ended is fine for this one
            state["phase"] = "removed"

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]


def _backward_ran(model: nn.Module) -> bool:
    return any(c["fp8_gemms_observed"]["wgrad"] + c["hp_gemms_observed"]["wgrad"] + c["fp8_gemms_observed"]["dgrad"]
               + c["hp_gemms_observed"]["dgrad"] for c in gemm_counts(model).values())


__all__ = ["finalize", "gemm_counts", "verify_now", "verify_on_first_forward"]
