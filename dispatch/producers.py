"""Producer choices of a plan: which fprop inputs are quantized by the op that produces them.

A Linear whose input is a LayerNorm/RMSNorm output read by nothing else can take that
input in FP8 straight from the norm: loka.mods.fused_norm_quant computes the norm and
the rowwise FP8 cast in one pass (``producer: "norm_quant"`` on the site), so fprop
pays no amax or cast pass over its activation. Only the model's dataflow says where
that holds, so the choice is made on the model (``with_producers``), after the
planner chose the GEMMs, and applied with ``apply_producers`` after ``apply_plan``.

Where the plan's timings come from the speed model, the fprop time of such a site
drops the activation's cast (``loka.kernels.costmodel.quantize_us``); measured
timings include the cast and are left as they are (a conservative prediction).
Training and serving alike: with grad the fused block's backward equals the unfused one
(loka.mods.norm_quant_autograd; it recomputes the hp norm from the saved input), and
``loka.models.train`` applies the plan's producers as the inference engine does.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from loka.dispatch.plans import Plan, SitePlan
from loka.kernels.costmodel import DeviceModel, quantize_us
from loka.mods import fused_norm_quant
from loka.mods.graph import record
from loka.mods.norms import norm_info
from loka.mods.result import ModResult


def norm_fed_linears(model: nn.Module, sample) -> dict[str, str]:
    """``{linear fqn: norm fqn}`` for every norm whose output only one Linear reads."""
    out = {}
    for block in record(model, sample).norm_to_linear():
        info, _ = norm_info(_module(model, block.norm))
        if info is not None and block.exclusive and len(block.linears) == 1:
            out[block.linears[0]] = block.norm
    return out


def _module(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn)


def _takes_norm_quant(site: SitePlan) -> bool:
    c = site.gemms["fprop"]
    if not c.is_fp8:
        return False
    a = c.gemm_recipe("fprop").a
    return a.granularity == "rowwise" and a.scaling == "dynamic"


def with_producers(plan: Plan, model: nn.Module, sample, dev: DeviceModel | None = None) -> Plan:
    """``plan`` with ``producer="norm_quant"`` on every FP8 rowwise-fprop site fed by its own norm."""
    fed = norm_fed_linears(model, sample)
    modelled = (plan.device or {}).get("source") == "model"
    sites, n = [], 0
    for s in plan.sites:
        if s.fqn not in fed or s.producer is not None or not _takes_norm_quant(s):  # one producer a site
            sites.append(s)
            continue
        c = s.gemms["fprop"]
        ms = c.planned_ms
        if modelled and dev is not None and ms is not None:
            ms = max(ms - quantize_us(max(s.m, 1), s.in_features, dev) / 1e3, 0.0)
        fprop = replace(c, planned_ms=ms, reason=f"{c.reason}; input quantized by {fed[s.fqn]} (fused norm+quantize)")
        sites.append(replace(s, gemms={**s.gemms, "fprop": fprop}, producer="norm_quant"))
        n += 1
    notes = list(plan.notes)
    if n:
        notes.append(f"{n} sites take their fprop input in FP8 from the preceding norm (norm_quant, training and serving)"
                     + ("" if modelled else "; their timings include a separate cast (conservative)"))
    return replace(plan, sites=sites, notes=notes)


def apply_producers(model: nn.Module, plan: Plan, sample) -> ModResult:
    """Fuse norm+quantize at the plan's ``norm_quant`` sites (after ``apply_plan``), for training or serving.

    The mod checks once, on one run of ``sample`` without grad, that each Linear receives its
    norm's output unchanged; then the norm runs inside the Linear's call (one autograd function,
    with grad or without, one graph under torch.compile).
    """
    only = {s.fqn for s in plan.sites if s.producer == "norm_quant"}
    return fused_norm_quant.apply(model, sample=sample, recipe="rowwise", only_fp8=True, only=only)



def producer_sites(model: nn.Module, sample) -> dict[str, str]:
    """``{linear fqn: "norm_quant"}`` for ``loka.dispatch.plan(producers=...)``: the sites whose
    input can come in FP8 from their own norm, known before the GEMMs are chosen (the planner
    then prices their FP8 candidates without the input's cast)."""
    return {fqn: "norm_quant" for fqn in norm_fed_linears(model, sample)}
