"""loka.dispatch: choose and run the fastest FP8 kernel per site and GEMM.

- kernels: the ``GemmKernel`` interface and its typed registry ``KERNELS`` with the
  built-in backends (bf16, emulated, scaled_mm, torchao, te, triton);
- ``microbench``: time kernels at a site's shape, cached on disk;
- ``plan(report, budget) -> Plan``: the fastest kernel per GEMM within the budget;
- ``apply_plan(model, plan)`` (also ``loka.convert(model, plan=plan)``);
- ``broadcast_plan(plan)``: one plan for every data-parallel rank.
"""

from loka.dispatch.kernel import KERNELS, GemmKernel, KernelRegistry, Quantized, Support
from loka.dispatch import registry as _registry  # noqa: F401  (registers built-in kernels)
from loka.dispatch.apply import PlanMismatchError, apply_plan, plan_differences
from loka.dispatch.budget import Budget
from loka.dispatch.distributed import broadcast_plan
from loka.dispatch.planner import plan
from loka.dispatch.plans import GemmChoice, Plan, PlanError, SitePlan, load_plan


def get_kernel(name: str) -> GemmKernel:
    """The registered kernel called ``name`` (e.g. ``"scaled_mm"``)."""
    return KERNELS.get(name)


__all__ = [
    "KERNELS",
    "Budget",
    "GemmChoice",
    "GemmKernel",
    "KernelRegistry",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "Quantized",
    "SitePlan",
    "Support",
    "apply_plan",
    "broadcast_plan",
    "get_kernel",
    "load_plan",
    "plan",
    "plan_differences",
]
