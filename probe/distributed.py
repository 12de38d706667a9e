"""Merging a probe's state across DDP ranks with torch.distributed collectives.

Statistics reduce with ``all_reduce`` using each state key's own merge op (sum, max
or min; see :mod:`loka.probe.stats`), packed into one flat tensor per op so a site
costs three collectives whatever the number of statistics. Ranks that never saw a
site contribute the identity of each op. Error observations, per-step amax values and
the values kept for fits are small Python objects and are merged with
``all_gather_object``: observations of the same step on several ranks become one
observation weighted by micro-batch count, as if one process had seen every rank's data.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from loka.recipe import ROLES
from loka.probe.error import ErrorTrack
from loka.probe.stats import MERGE_OPS_BY_KEY, N_LOG2_BINS, STATISTICS, OperandStats

_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}
_REDUCE_OP = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _key_shapes(n_channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {k: () for s in STATISTICS.values() for k in s.merge_ops}
    shapes["over_prev_amax"] = ()
    shapes["log2_hist"] = (N_LOG2_BINS,)
    shapes["col_amax"] = (n_channels,)
    return shapes


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def reduce_operand(stats: OperandStats, n_channels: int, group=None, replicated: bool = False) -> None:
    """All-reduce one operand's mergeable state in place (every rank gets the merged state).

    ``replicated``: every rank holds the same tensor (the weight under DDP, or FSDP's
    gathered weight), so sums are averaged instead of added.
    """
    shapes = _key_shapes(n_channels)
    device = _collective_device(group)
    for op in ("sum", "max", "min"):
        keys = sorted(k for k in shapes if MERGE_OPS_BY_KEY[k] == op)
        parts = []
        for k in keys:
            v = stats.state.get(k)
            if v is None:
                v = torch.full(shapes[k], _IDENTITY[op], dtype=torch.float64)
            parts.append(v.reshape(-1).double())
        flat = torch.cat(parts).to(device)
        dist.all_reduce(flat, op=_REDUCE_OP[op], group=group)
        flat = flat.cpu()
        if replicated and op == "sum":
            flat = flat / dist.get_world_size(group)
        offset = 0
        for k in keys:
            n = math.prod(shapes[k])
            stats.state[k] = flat[offset : offset + n].reshape(shapes[k]).clone()
            offset += n
    seen = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, stats.step_amax, group=group)
    stats.step_amax = {}
    for d in seen:
        for step, amax in d.items():
            stats.step_amax[step] = max(stats.step_amax.get(step, 0.0), amax)


def _channels(site, role: str) -> int:
    return site.out_features if role == "grad_output" else site.in_features


def reduce_probe(probe, group=None) -> None:
    """Merge every site's statistics, error observations and kept values across ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return  # one process: nothing to merge
    for fqn in sorted(probe.state):
        st = probe.state[fqn]
        seen = torch.tensor([0.0 if st.operands[r].empty else 1.0 for r in ROLES], device=_collective_device(group))
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
        for role, any_rank in zip(ROLES, seen.tolist()):
            if any_rank > 0:  # same decision on every rank, so the collectives line up
                reduce_operand(st.operands[role], _channels(st.site, role), group, replicated=role == "weight")
        _gather_site_objects(st, group)
    steps = [None] * dist.get_world_size(group)
    dist.all_gather_object(steps, probe.sampled_steps, group=group)
    probe.sampled_steps = sorted({s for r in steps for s in r})


def _gather_site_objects(st, group) -> None:
    mine = {
        "errors": st.errors,
        "m_values": st.m_values,
        "samples": st.samples,
        "steps": st.steps,
        "micro_batches": st.micro_batches,
    }
    theirs = [None] * dist.get_world_size(group)
    dist.all_gather_object(theirs, mine, group=group)
    errors: dict[str, dict[str, ErrorTrack]] = {}
    for recipe in sorted({r for t in theirs for r in t["errors"]}):
        gemms = {g for t in theirs for g in t["errors"].get(recipe, {})}
        errors[recipe] = {g: ErrorTrack.merged([t["errors"][recipe][g] for t in theirs if recipe in t["errors"]])
                          for g in sorted(gemms)}
    st.errors = errors
    st.m_values = set().union(*(t["m_values"] for t in theirs))
    st.steps = sorted({s for t in theirs for s in t["steps"]})
    st.micro_batches = sum(t["micro_batches"] for t in theirs)
    for role in ROLES:
        kept = [t["samples"][role] for t in theirs if role in t["samples"]]
        if kept:
            st.samples[role] = torch.cat(kept)
