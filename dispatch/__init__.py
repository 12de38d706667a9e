"""loka.dispatch (layer 3): choose the fastest FP8 kernel per site and GEMM, and apply the choice.

It reads probe reports through ``loka.probe.reader`` and writes plans (``plans``); the
names ``planner`` (chooses), ``plans`` (the file) and ``plan_table`` (renders) are one
role each.

The kernels themselves (``GemmKernel``, the registry ``KERNELS``, the backends and
the speed model) live below, in ``loka.kernels``; this layer measures and chooses:

- ``microbench``: time kernels at a site's shape, cached on disk;
- ``plan(report, budget) -> Plan``: the fastest kernel per GEMM within the budget;
- ``apply_plan(model, plan)`` (also ``loka.convert(model, plan=plan)``);
- ``broadcast_plan(plan)``: one plan for every data-parallel rank.
"""

import importlib
import warnings

from loka.dispatch.apply import PlanMismatchError, apply_plan, plan_differences
from loka.dispatch.budget import Budget
from loka.dispatch.distributed import broadcast_plan
from loka.dispatch.planner import plan
from loka.dispatch.plans import GemmChoice, Plan, PlanError, SitePlan, load_plan

# Names that moved to loka.kernels (commit "a one-way house", 2026-11-30): deprecated aliases,
# removed in the next release. ``loka.dispatch.costmodel`` is a module alias (dispatch/costmodel.py).
_MOVED_TO_KERNELS = ("KERNELS", "GemmKernel", "KernelRegistry", "Quantized", "Support", "get_kernel")


def __getattr__(name: str):
    if name in _MOVED_TO_KERNELS:
        warnings.warn(f"loka.dispatch.{name} moved to loka.kernels.{name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("loka.kernels"), name)
    if name == "costmodel":
        return importlib.import_module("loka.dispatch.costmodel")
    raise AttributeError(f"module 'loka.dispatch' has no attribute {name!r}")


__all__ = [
    "Budget",
    "GemmChoice",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "SitePlan",
    "apply_plan",
    "broadcast_plan",
    "load_plan",
    "plan",
    "plan_differences",
]
