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

A precision is parsed once at the edge (CLI, config, engine) into a typed :class:`Precision`;
a plan file is loaded there, once, and the loaded Plan travels with the value to conversion and
to the producer fusion. The old string spellings (``"bf16"``, ``"fp8"``, ``"runs/plan.json"``) are
accepted wherever a Precision is, and ``str(precision)`` gives them back (what checkpoints record).

Conversion reuses the model's Parameters and keeps nn.Linear's state_dict keys, so a bf16
checkpoint loads into the converted model and back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from loka.convert import convert
from loka.dispatch import Plan, apply_plan, load_plan
from loka.dispatch.producers import apply_producers

HP_PRECISIONS = ("bf16", "fp32")
KINDS = (*HP_PRECISIONS, "fp8", "plan")


@dataclass(frozen=True)
class Precision:
    """``kind``: ``bf16`` / ``fp32`` (no conversion), ``fp8`` (every Linear tensorwise) or ``plan``
    (``plan``: the loaded Plan; ``plan_path``: the file it came from, None for a Plan in memory).

    >>> Precision.parse("fp8"), str(Precision.parse("bf16"))
    (Precision(kind='fp8', plan_path=None), 'bf16')
    """

    kind: str = "bf16"
    plan_path: str | None = None
    plan: Plan | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"precision kind {self.kind!r} is not one of {list(KINDS)}; "
                             "use Precision.parse('bf16' | 'fp32' | 'fp8' | a plan file path)")
        if (self.kind == "plan") != (self.plan is not None) or (self.plan_path is not None and self.kind != "plan"):
            raise ValueError(f"precision {self.kind!r}: a plan (and its path) goes with kind 'plan' and only "
                             "with it; build it with Precision.parse(path) or Precision.of_plan(plan)")

    @classmethod
    def parse(cls, value: "Precision | Plan | str | os.PathLike") -> "Precision":
        """The Precision of ``value``: a Precision (as is), a Plan, or an old spelling (a plan path is
        loaded here, once); ``ValueError`` / ``PlanError`` in one line naming the fix."""
        if isinstance(value, Precision):
            return value
        if isinstance(value, Plan):
            return cls.of_plan(value)
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"precision must be 'bf16', 'fp32', 'fp8' or a plan file path, got {type(value).__name__}")
        value = os.fspath(value)
        check_precision(value)
        if value in HP_PRECISIONS or value == "fp8":
            return cls(value)
        return cls("plan", value, load_plan(value))

    @classmethod
    def of_plan(cls, plan: Plan, path: str | None = None) -> "Precision":
        return cls("plan", path, plan)

    @property
    def is_hp(self) -> bool:
        return self.kind in HP_PRECISIONS

    def __str__(self) -> str:
        """The old spelling: the kind, or the plan's path (``"plan"`` for a plan in memory)."""
        return self.plan_path if self.plan_path is not None else self.kind


def check_precision(precision: str) -> None:
    """Raise ValueError unless ``precision`` is bf16, fp32, fp8 or an existing plan file."""
    if precision in HP_PRECISIONS or precision == "fp8":
        return
    if not precision.endswith(".json") and not os.path.exists(precision):
        raise ValueError(f"precision={precision!r} is not 'bf16', 'fp32', 'fp8' or a plan file path; "
                         "pass one of those (plans are written by `loka plan`).")
    if not os.path.isfile(precision):
        raise ValueError(f"plan file {precision!r} does not exist; write it with `loka plan` first.")


def apply_precision(model: nn.Module, precision: "Precision | str", compile: bool | None = None, *,
                    verify_run: bool = True):
    """Convert ``model`` in place for ``precision``; returns loka's ConvertResult or None (hp).

    ``precision``: a :class:`Precision` (its plan is not loaded again) or an old spelling.
    ``compile``: whether the model will run under torch.compile (``False`` warns about a plan's
    ``compiled_cast`` sites, whose casts then run unfused; ``None``: not said). ``verify_run=False``:
    the conversion is not observed on the first step (a resumed run; see ``loka.convert.convert``).
    """
    precision = Precision.parse(precision)
    if precision.is_hp:
        return None
    if precision.kind == "fp8":
        return convert(model, recipe="tensorwise", verify_run=verify_run)
    return apply_plan(model, precision.plan, compile=compile, verify_run=verify_run)


def plan_producers(precision: "Precision | str"):
    """The plan of ``precision`` when it has ``norm_quant`` producer sites, else None."""
    plan = Precision.parse(precision).plan
    return plan if plan is not None and any(s.producer == "norm_quant" for s in plan.sites) else None


def apply_plan_producers(model: nn.Module, precision: "Precision | str", sample):
    """Fuse norm+quantize at the plan's ``norm_quant`` sites (after ``apply_precision`` and ``.to``).

    ``precision``: the Precision given to ``apply_precision`` (the same loaded plan).
    ``sample``: a batch on the model's device; the mod records the dataflow on it and runs it
    once without grad (under a forked RNG, so training draws the same numbers after it).
    Returns the mod's ModResult, or None when the plan has no producer choices.
    """
    plan = plan_producers(precision)
    if plan is None:
        return None
    with torch.random.fork_rng(devices=[]):
        return apply_producers(model, plan, sample)
