"""Precision of the ranker's GEMM sites: ``bf16`` (default), ``fp8``, or a loka plan file.

- ``bf16``: no conversion; the trainer autocasts to bf16 where the device supports it.
- ``fp8``: every Linear through `loka.Float8Linear` via ``loka.convert.convert(model, recipe="tensorwise")``,
  the naive convert-everything baseline.
- a path to a plan JSON: ``loka.dispatch.load_plan(path)`` then ``loka.dispatch.apply_plan(model, plan)``,
  each site with its planned kernel (or kept in bf16).

A plan whose sites say ``producer: "norm_quant"`` also fuses those sites' norm and FP8 cast
(``apply_plan_producers``, after the model is on its device): the trainer and the inference
engine both run the fused block, whose backward equals the unfused one
(loka.mods.norm_quant_autograd).

Conversion reuses the model's Parameters and keeps nn.Linear's state_dict keys, so a bf16
checkpoint loads into the converted model and back.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from loka.convert import convert
from loka.dispatch import apply_plan, load_plan
from loka.dispatch.producers import apply_producers

HP_PRECISIONS = ("bf16", "fp32")


def check_precision(precision: str) -> None:
    """Raise ValueError unless ``precision`` is bf16, fp32, fp8 or an existing plan file."""
    if precision in HP_PRECISIONS or precision == "fp8":
        return
    if not precision.endswith(".json") and not os.path.exists(precision):
        raise ValueError(f"precision={precision!r} is not 'bf16', 'fp32', 'fp8' or a plan file path; "
                         "pass one of those (plans are written by `loka plan`).")
    if not os.path.isfile(precision):
        raise ValueError(f"plan file {precision!r} does not exist; write it with `loka plan` first.")


def apply_precision(model: nn.Module, precision: str, compile: bool | None = None):
    """Convert ``model`` in place for ``precision``; returns loka's ConvertResult or None (hp).

    ``compile``: whether the model will run under torch.compile (``False`` warns about a plan's
    ``compiled_cast`` sites, whose casts then run unfused; ``None``: not said).
    """
    check_precision(precision)
    if precision in HP_PRECISIONS:
        return None
    if precision == "fp8":
        return convert(model, recipe="tensorwise")
    return apply_plan(model, load_plan(precision), compile=compile)


def plan_producers(precision: str):
    """The plan of ``precision`` when it has ``norm_quant`` producer sites, else None."""
    if precision in HP_PRECISIONS or precision == "fp8":
        return None
    plan = load_plan(precision)
    return plan if any(s.producer == "norm_quant" for s in plan.sites) else None


def apply_plan_producers(model: nn.Module, precision: str, sample):
    """Fuse norm+quantize at the plan's ``norm_quant`` sites (after ``apply_precision`` and ``.to``).

    ``sample``: a batch on the model's device; the mod records the dataflow on it and runs it
    once without grad (under a forked RNG, so training draws the same numbers after it).
    Returns the mod's ModResult, or None when the plan has no producer choices.
    """
    plan = plan_producers(precision)
    if plan is None:
        return None
    with torch.random.fork_rng(devices=[]):
        return apply_producers(model, plan, sample)
