"""Share one plan across data-parallel ranks: made on one rank, broadcast to all.

Micro-benchmarks differ slightly between GPUs, so planning on every rank could
give ranks different kernels for the same site (and different numerics). The
plan is made once (on ``src``) and broadcast as its JSON text with
``torch.distributed.broadcast_object_list``; every rank then applies the same plan.
"""

from __future__ import annotations

import torch.distributed as dist

from loka.dispatch.plans import Plan


def broadcast_plan(plan: Plan | None, src: int = 0, group=None) -> Plan:
    """Return ``src``'s plan on every rank (a collective: call it on every rank).

    ``plan`` is the plan on rank ``src`` and ignored (may be None) elsewhere. Without an
    initialized process group the plan is returned as is.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if plan is None:
            raise ValueError("broadcast_plan without torch.distributed needs a plan; got None")
        return plan
    rank = dist.get_rank(group)
    if rank == src and not isinstance(plan, Plan):
        raise ValueError(f"rank {src} must pass the Plan to broadcast, got {type(plan).__name__}")
    payload = [plan.to_json() if rank == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    return Plan.from_json(payload[0])
