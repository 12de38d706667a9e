"""The ``compiled_cast`` producer choice: an FP8 cast torch.compile fused into the op producing its operand.

Under torch.compile, inductor can compute a site's fprop input cast (amax, scale, cast) in
the kernel that produces the input (an activation, a residual add, a norm), and in a
training step the cast of dgrad's gradient operand in the kernel producing that gradient
(``silu_backward``, ...): the GEMM then pays no separate pass over its activation. Whether
that happens depends on the model's dataflow and on inductor, so the plan claims it only
where it is proven on inductor's own output (``loka.kernels.fusion_check``):

- a kernel whose ops are all quantize ops (``CAST_OPS``) and that takes an amax is a
  *separate cast pass*; one that takes an amax beside another op is a *fused cast*;
- group testing attributes separate casts to sites: the model is compiled with only a subset
  of the candidate sites converted; a subset without a separate cast is proven fused, one
  with is split in two until each unfused site stands alone (all fused: one compile).

Conservative by construction: a weight's cast in a kernel of its own (likely on CUDA in a
training step, where the weight is cast in the graph) also counts as a separate pass, so the
site is left unproven. On CPU, inductor's C++ backend also merges independent loops into one
kernel, so there "no separate cast" means the cast shares a kernel with other work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from loka.dispatch.apply import apply_plan
from loka.dispatch.planner import plan as make_plan
from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.kernels.costmodel import DeviceModel, quantize_us
from loka.kernels.fusion_check import generated_kernels
from loka.mods.graph import run_sample
from loka.probe.reader import report_sites
from loka.recipe import gemm_shape
from loka.weight_cache import freeze_fp8_weights

# The ATen ops of loka.quantize's cast as inductor names them (seen on torch 2.13 CPU, tests/dispatch/
# test_compiled_casts.py), plus the layout ops around it and CPU's upcast of _scaled_mm's operands.
CAST_OPS = frozenset({
    "_scaled_mm", "_to_copy", "abs", "amax", "max", "clamp", "clamp_min", "clamp_max", "clone", "div", "mul",
    "reciprocal", "maximum", "minimum", "sub", "gt", "ge", "lt", "le", "eq", "ne", "where", "ones_like",
    "full", "scalar_tensor", "nan_to_num", "isnan", "isinf", "frexp", "t", "view", "permute", "reshape",
    "_unsafe_view", "unsqueeze", "squeeze", "copy", "round", "log2", "exp2", "pow", "floor", "ceil",
})
_KERNEL_PREFIXES = ("cpp_fused_", "triton_poi_fused_", "triton_red_fused_", "triton_per_fused_", "triton_tem_fused_")


def kernel_ops_left(name: str, ops=CAST_OPS) -> list[str]:
    """The parts of kernel ``name`` that are not one of ``ops`` (ATen op names hold '_', so match whole ops)."""
    body = name
    for prefix in _KERNEL_PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    body = body.rstrip("0123456789").rstrip("_") if body[-1:].isdigit() else body
    s = f"_{body}_"
    for op in sorted(ops, key=len, reverse=True):
        while f"_{op}_" in s:
            s = s.replace(f"_{op}_", "_")
    return [t for t in s.split("_") if t]


def is_separate_cast(name: str) -> bool:
    """A kernel that takes an amax and does nothing but quantize: a pass of its own over its operand."""
    return "amax" in name and not kernel_ops_left(name)


def is_fused_cast(name: str) -> bool:
    """A kernel that takes an amax beside a producer op (an activation, an add, a norm, a backward op)."""
    return "amax" in name and bool(kernel_ops_left(name))


@dataclass(frozen=True)
class CastProof:
    """Whether ``fqn``'s casts were proven fused under torch.compile, and the kernels that say so."""

    fqn: str
    fused: bool
    evidence: str
    separate_casts: tuple = ()  # cast-only kernels seen with this site converted alone (unfused sites)


@dataclass(frozen=True)
class CastProofs:
    """Per-site proofs of one model, sample and mode, with the kernel counts behind them."""

    train: bool
    sites: tuple  # tuple[CastProof], in plan order
    kernels_fp8: int  # every candidate converted
    kernels_bf16: int  # no site converted
    fused_kernels: tuple  # kernels taking an amax beside a producer op (every candidate converted)
    compiles: int

    def proven(self) -> list[str]:
        return [p.fqn for p in self.sites if p.fused]

    def summary(self) -> str:
        mode = "training step (forward + backward)" if self.train else "forward (no grad)"
        head = (f"compiled casts, {mode}: {len(self.proven())}/{len(self.sites)} sites fused; kernels "
                f"{self.kernels_fp8} with every candidate in FP8, {self.kernels_bf16} in bf16; {self.compiles} compiles")
        return "\n".join([head] + [f"  {p.fqn}: {'fused' if p.fused else 'NOT fused'} ({p.evidence})"
                                   for p in self.sites])


def candidate_sites(plan: Plan) -> list[str]:
    """Sites whose fprop input cast could be torch.compile's: FP8 fprop, no other producer (norm_quant)."""
    return [s.fqn for s in plan.sites if s.gemms["fprop"].is_fp8 and s.producer in (None, "compiled_cast")]


def _subplan(plan: Plan, keep: set) -> Plan:
    """``plan`` with every site outside ``keep`` in bf16 (the model stays covered for apply_plan)."""
    bf16 = {g: GemmChoice() for g in plan.sites[0].gemms} if plan.sites else {}
    sites = [s if s.fqn in keep else replace(s, gemms=dict(bf16), producer=None) for s in plan.sites]
    return replace(plan, sites=sites)


def _loss(out) -> torch.Tensor:
    """Sum of every floating tensor in a model's output (a tensor, tuple, list or dict)."""
    leaves = torch.utils._pytree.tree_leaves(out)
    parts = [t.float().sum() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not parts:
        raise ValueError("the model's output holds no floating tensor to back-propagate; pass train=False")
    return torch.stack(parts).sum()


def compiled_kernels(model: nn.Module, plan: Plan, keep: set, sample, *, train: bool,
                     dynamic: bool | None = False) -> list[str]:
    """Inductor's kernels for a deep copy of ``model`` with only the ``keep`` sites of ``plan`` converted."""
    m = copy.deepcopy(model)
    apply_plan(m, _subplan(plan, keep))
    patch = {"kernel_name_max_ops": 10_000} if hasattr(torch._inductor.config, "kernel_name_max_ops") else {}
    with torch._inductor.config.patch(patch):  # Triton names keep 10 ops by default: an amax could drop out
        if not train:
            m.eval()
            freeze_fp8_weights(m)  # serving casts its weights once, outside the graph (as InferenceEngine)
            with torch.no_grad():
                return generated_kernels(lambda: run_sample(m, sample), dynamic=dynamic)
        m.train()
        return generated_kernels(lambda: _loss(run_sample(m, sample)).backward(), dynamic=dynamic)


def prove_compiled_casts(model: nn.Module, plan: Plan, sample, *, train: bool, dynamic: bool | None = False) -> CastProofs:
    """Which candidate sites' casts inductor fuses into their producers (module docstring); ``model`` is untouched."""
    sites = candidate_sites(plan)
    if not sites:
        return CastProofs(train, (), 0, 0, (), 0)
    count = [0]

    def separate(keep) -> list[str]:
        count[0] += 1
        return [n for n in compiled_kernels(model, plan, set(keep), sample, train=train, dynamic=dynamic)
                if is_separate_cast(n)]

    all_names = compiled_kernels(model, plan, set(sites), sample, train=train, dynamic=dynamic)
    bf16_names = compiled_kernels(model, plan, set(), sample, train=train, dynamic=dynamic)
    count[0] += 2
    unfused: dict[str, list[str]] = {}

    def split(group: list[str], casts: list[str]) -> None:  # ``casts``: seen with ``group`` converted
        if len(group) == 1:
            unfused[group[0]] = casts
            return
        for half in (group[: len(group) // 2], group[len(group) // 2:]):
            found = separate(half)
            if found:
                split(half, found)

    top = [n for n in all_names if is_separate_cast(n)]
    if top:
        split(sites, top)
    fused = tuple(n for n in all_names if is_fused_cast(n))
    proofs = []
    for fqn in sites:
        if fqn in unfused:
            ev = (f"converted alone, its cast runs as a kernel of its own: {', '.join(unfused[fqn])}; its operand is "
                  "not produced by a kernel inductor fuses the cast into (a graph input or a GEMM's output)")
            proofs.append(CastProof(fqn, False, ev, tuple(unfused[fqn])))
        else:
            ev = (f"no cast-only kernel with it converted ({len(all_names)} kernels with every candidate in FP8, "
                  f"{len(bf16_names)} in bf16; {len(fused)} kernels take an amax beside their producer op)")
            proofs.append(CastProof(fqn, True, ev))
    return CastProofs(train, tuple(proofs), len(all_names), len(bf16_names), fused, count[0])


def _drop_cast(c: GemmChoice, gemm: str, site: SitePlan, dev: DeviceModel | None, modelled: bool) -> float | None:
    """``c.planned_ms`` less the speed model's pass over the GEMM's ``a`` operand (modelled plans only)."""
    if not (modelled and dev is not None and c.planned_ms is not None):
        return c.planned_ms
    rows, cols, _ = gemm_shape(gemm, max(site.m, 1), site.in_features, site.out_features)
    dynamic = c.gemm_recipe(gemm).a.scaling == "dynamic"
    return max(c.planned_ms - quantize_us(rows, cols, dev, amax_pass=dynamic) / 1e3, 0.0)


def with_compiled_casts(plan: Plan, model: nn.Module, sample, *, train: bool, dev: DeviceModel | None = None,
                        proofs: CastProofs | None = None, dynamic: bool | None = False) -> Plan:
    """``plan`` with ``producer="compiled_cast"`` on the FP8 sites whose casts inductor was seen to fuse.

    ``train``: prove on a training step (fprop's input and dgrad's gradient operand) or a
    no-grad forward (serving: fprop's input). Plans timed by the speed model (``device.source
    == "model"``) drop the cast from fprop's planned_ms (and from dgrad's, in training);
    measured timings include it and stay (conservative). Sites not proven keep producer None.
    """
    proofs = proofs if proofs is not None else prove_compiled_casts(model, plan, sample, train=train, dynamic=dynamic)
    if proofs.train != train:
        raise ValueError(f"the proofs were made with train={proofs.train}, the plan is asked for train={train}; "
                         "prove again in the mode the model will run in")
    by_fqn = {p.fqn: p for p in proofs.sites}
    modelled = (plan.device or {}).get("source") == "model"
    mode = "training step" if train else "no-grad forward"
    candidates, sites = set(candidate_sites(plan)), []
    for s in plan.sites:
        proof = by_fqn.get(s.fqn)
        if s.fqn not in candidates or proof is None or not proof.fused:  # never over norm_quant
            sites.append(replace(s, producer=None) if s.producer == "compiled_cast" else s)
            continue
        gemms = dict(s.gemms)
        for g in ("fprop", "dgrad") if train else ("fprop",):
            c = gemms[g]
            if c.is_fp8:
                gemms[g] = replace(c, planned_ms=_drop_cast(c, g, s, dev, modelled),
                                   reason=f"{c.reason}; operand cast fused by torch.compile into its producer "
                                          f"({mode}: {proof.evidence})")
        sites.append(replace(s, gemms=gemms, producer="compiled_cast"))
    return replace(plan, sites=sites, notes=list(plan.notes) + [_note(proofs, modelled)])


def _note(proofs: CastProofs, modelled: bool) -> str:
    proven = proofs.proven()
    not_proven = [f"{p.fqn} ({p.evidence.split(';')[0]})" for p in proofs.sites if not p.fused]
    mode = "training step" if proofs.train else "no-grad forward"
    text = (f"compiled_cast ({mode}, {proofs.kernels_fp8} kernels vs {proofs.kernels_bf16} in bf16): proven fused at "
            f"{', '.join(proven) or 'no site'}; not proven at {', '.join(not_proven) or 'no site'}")
    return text + ("" if modelled or not proven else "; their measured timings include the cast (conservative)")


def plan_with_compiled_casts(report, model: nn.Module, sample, *, train: bool, producers: dict | None = None,
                             dynamic: bool | None = False, **plan_kwargs) -> tuple[Plan, CastProofs]:
    """A plan in which the casts torch.compile fuses into their producers are not paid, proven first.

    ``with_compiled_casts`` marks a plan already made, so a site that loses to bf16 with its
    cast but wins without it stays bf16 there. This plans in three steps instead:

    1. an optimistic plan (``loka.dispatch.plan(report, **plan_kwargs)``) with every site not fed
       by a given producer (``producers``, e.g. norm_quant) priced as if its casts were fused;
    2. ``prove_compiled_casts`` on ``model`` for that plan's FP8 sites (``train``: a training
       step, which proves dgrad's ``dy`` cast too; else a no-grad forward, for serving plans);
    3. the final plan with the given producers plus the proven sites as ``compiled_cast``.

    Returns the final plan (a note gives the proof) and the proofs. A no-grad proof says nothing
    about dgrad, so ``train=False`` needs a serving plan (``m_buckets=...``, fprop only).
    """
    if not train and not plan_kwargs.get("m_buckets"):
        raise ValueError("train=False proves only fprop's cast, but this is a training plan (dgrad is priced "
                         "too): pass train=True, or m_buckets=[...] for a serving plan")
    given = dict(producers or {})
    assumed = {s.fqn: "compiled_cast" for s in report_sites(report)}
    optimistic = make_plan(report, producers={**assumed, **given}, **plan_kwargs)
    proofs = prove_compiled_casts(model, optimistic, sample, train=train, dynamic=dynamic)
    final = make_plan(report, producers={**{f: "compiled_cast" for f in proofs.proven()}, **given}, **plan_kwargs)
    # the planner priced the proven sites without the cast itself (its own note says how)
    return replace(final, notes=list(final.notes) + [_note(proofs, True)]), proofs
