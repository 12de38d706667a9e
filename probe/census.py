"""GEMM census: every GEMM a model's forward runs, its owner, its FLOPs and whether loka converts it.

The probe's error hooks sit on ``nn.Linear`` sites. Models written by others also run
GEMMs as ``x @ self.W``, ``torch.einsum(..., self.W)``, ``torch.bmm`` and 1x1
``Conv1d``: on a DCN-style cross network with matrix weights the Linears were 28% of
the forward GEMM FLOPs, on a CIN model 8%, and nothing said so. The census watches a
forward at the ATen level (a ``TorchDispatchMode``), where every one of those reaches
``mm``/``addmm``/``bmm``/``baddbmm``/``convolution`` (or a fused attention kernel),
and maps an operand back to the ``nn.Parameter`` whose storage it views, so a GEMM is
named by the parameter's owner (the design's *site*) however the model's code wrote it.

FLOPs of a training step are counted as 3x the forward's (fprop, dgrad, wgrad have the
same FLOPs; a GEMM with no parameter operand, e.g. attention scores, also runs two
backward GEMMs when both operands need gradients). Shares are of that total.

Convertible (``loka.convert`` / ``loka.convert_gemms``): Linears, 1x1 convolutions, and
``x @ W`` with a 2-D parameter ``W[K, N]`` on the right. Sites that are convertible but
hold less than ``min_share`` of the step (an ``N=1`` head is typically 0.01-0.5%) are
reported as not worth converting: FP8 cannot win time back on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

NO_PARAM = "(no parameter operand)"
DEFAULT_MIN_SHARE = 0.01
_aten = torch.ops.aten
_MM = {_aten.mm.default: (0, 1), _aten.addmm.default: (1, 2), _aten.bmm.default: (0, 1), _aten.baddbmm.default: (1, 2)}
_SDPA = {getattr(_aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                                           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                           "_scaled_dot_product_attention_math")} - {None}


@dataclass
class CensusSite:
    """One site of the census: a parameter (or none) and the GEMMs that used it in one forward."""

    site: str
    kind: str  # linear | conv1x1 | conv | matmul | attention | activation
    param: str | None
    calls: int = 0
    forward_flops: float = 0.0
    shapes: list = field(default_factory=list)  # [(M, K, N)] per call (first few)
    right_operand: bool = True  # the parameter was always the right operand [K, N] of a 2-D product

    @property
    def n(self) -> int | None:
        return self.shapes[0][2] if self.shapes else None

    @property
    def k(self) -> int | None:
        return self.shapes[0][1] if self.shapes else None


def _param_owners(model: nn.Module) -> dict[int, tuple[str, str, nn.Module]]:
    """storage pointer -> (param fqn, site name, owner module); shared parameters keep the first name."""
    owners = {}
    for mod_fqn, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            full = f"{mod_fqn}.{name}" if mod_fqn else name
            site = mod_fqn if name == "weight" and isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) else full
            ptr = _storage_ptr(p)
            if ptr is not None:
                owners.setdefault(ptr, (full, site, mod))
    return owners


def _storage_ptr(p: torch.Tensor) -> int | None:
    """The parameter's storage, or None for a wrapper without one (an FSDP2 DTensor shard, a
    torchrec sharded table): its GEMMs run on a gathered copy, so the census cannot name them
    by storage and counts them under `NO_PARAM`."""
    try:
        return p.untyped_storage().data_ptr()
    except RuntimeError:  # "invalid python storage": a tensor subclass that holds no storage itself
        return None


def _kind(owner: nn.Module | None, func) -> str:
    if isinstance(owner, nn.Linear):
        return "linear"
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "conv1x1" if all(k == 1 for k in owner.kernel_size) and owner.groups == 1 else "conv"
    return "matmul"


class _CensusMode(TorchDispatchMode):
    def __init__(self, owners: dict) -> None:
        super().__init__()
        self.owners, self.sites = owners, {}

    def _site(self, key: str, kind: str, param: str | None) -> CensusSite:
        if key not in self.sites:
            self.sites[key] = CensusSite(key, kind, param)
        return self.sites[key]

    def _owner(self, t) -> tuple | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return None
        return self.owners.get(t.untyped_storage().data_ptr())

    def _record_mm(self, func, args, out) -> None:
        ia, ib = _MM[func]
        a, b = args[ia], args[ib]
        k = a.shape[-1]
        flops = 2.0 * out.numel() * k
        hit_b, hit_a = self._owner(b), self._owner(a)
        hit = hit_b or hit_a
        if hit is None:
            s = self._site(NO_PARAM, "activation", None)
        else:
            s = self._site(hit[1], _kind(hit[2], func), hit[0])
            # x @ W and einsum("...k,kn->...n") reach mm, or bmm on W broadcast over the batch
            flat_b = b.dim() == 2 or b.shape[0] == 1 or b.stride(0) == 0
            s.right_operand = s.right_operand and hit_b is not None and flat_b
        m = out.numel() // out.shape[-1]
        s.calls, s.forward_flops = s.calls + 1, s.forward_flops + flops
        if len(s.shapes) < 4:
            s.shapes.append((int(m), int(k), int(out.shape[-1])))

    def _record_conv(self, args, out) -> None:
        x, w = args[0], args[1]
        groups = args[8] if len(args) > 8 else 1
        per_out = (x.shape[1] // groups) * math.prod(w.shape[2:])
        hit = self._owner(w)
        s = self._site(hit[1], _kind(hit[2], None), hit[0]) if hit else self._site(NO_PARAM, "activation", None)
        s.calls, s.forward_flops = s.calls + 1, s.forward_flops + 2.0 * out.numel() * per_out
        if len(s.shapes) < 4:
            s.shapes.append((int(out.numel() // out.shape[1]), int(per_out), int(out.shape[1])))

    def _record_sdpa(self, args) -> None:
        q, k_, v = args[0], args[1], args[2]  # [B, H, L, E], [B, H, S, E], [B, H, S, Ev]
        flops = 2.0 * math.prod(q.shape[:-1]) * k_.shape[-2] * (q.shape[-1] + v.shape[-1])
        s = self._site("(attention kernel)", "attention", None)
        s.calls, s.forward_flops = s.calls + 1, s.forward_flops + flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MM:
            self._record_mm(func, args, out)
        elif func is _aten.convolution.default:
            self._record_conv(args, out)
        elif func.overloadpacket in _SDPA:
            self._record_sdpa(args)
        return out


@dataclass
class GemmCensus:
    """The census of one forward: sites by name, and what loka probes and converts of them."""

    sites: dict[str, CensusSite]
    probed: frozenset = frozenset()  # sites the probe measures errors at (its Linear sites)
    min_share: float = DEFAULT_MIN_SHARE

    @property
    def step_flops(self) -> float:
        return 3.0 * sum(s.forward_flops for s in self.sites.values())

    def share(self, site: str) -> float:
        total = self.step_flops
        return 3.0 * self.sites[site].forward_flops / total if total else 0.0

    def convertible(self, s: CensusSite) -> tuple[bool, str]:
        """Whether loka converts the site, and why not."""
        if s.kind in ("linear", "conv1x1"):
            return True, ""
        if s.kind == "matmul":
            return (True, "") if s.right_operand else (False, "parameter is not the right operand [K, N] of a 2-D product")
        if s.kind == "conv":
            return False, "convolution wider than 1x1 (not a plain GEMM)"
        return False, "no parameter operand (activation x activation GEMM)"

    def worth(self, s: CensusSite) -> tuple[bool, str]:
        share = self.share(s.site)
        if share < self.min_share:
            shape = f"N={s.n}, " if s.n is not None and s.n < 16 else ""
            return False, f"not worth converting: {shape}{share:.2%} of the step's GEMM FLOPs (< {self.min_share:.0%})"
        return True, ""

    def summary(self) -> dict:
        """JSON-ready: per site kind, share, shapes, probed / convertible / worth; and the shares in total."""
        rows, conv_share, worth_share, probed_share = [], 0.0, 0.0, 0.0
        for name in sorted(self.sites, key=lambda n: -self.sites[n].forward_flops):
            s = self.sites[name]
            share = self.share(name)
            ok, why = self.convertible(s)
            good, why_not = self.worth(s) if ok else (False, why)
            conv_share += share if ok else 0.0
            worth_share += share if good else 0.0
            probed_share += share if name in self.probed else 0.0
            rows.append({"site": name, "kind": s.kind, "param": s.param, "calls": s.calls, "share": share,
                         "shapes": [list(x) for x in s.shapes], "probed": name in self.probed,
                         "convertible": ok, "worth_converting": good, "reason": why_not if not good else ""})
        return {"step_gemm_flops": self.step_flops, "probed_share": probed_share, "convertible_share": conv_share,
                "worth_share": worth_share, "min_share": self.min_share, "sites": rows}

    def table(self) -> str:
        d = self.summary()
        lines = [f"GEMM census: {d['step_gemm_flops']:.3g} FLOPs a step; probed {d['probed_share']:.1%}, "
                 f"convertible {d['convertible_share']:.1%}, worth converting {d['worth_share']:.1%}"]
        for r in d["sites"]:
            flags = "probed" if r["probed"] else ("convertible" if r["convertible"] else "hp")
            lines.append(f"  {r['site']:<40} {r['kind']:<10} {r['share']:>7.2%}  {flags:<11} {r['reason']}")
        return "\n".join(lines)


class CensusHooks:
    """Takes the census of the next forward of ``model`` (forward pre-hook enters, forward hook leaves).

    The probe installs it on its first sampled step, so the census costs one forward.
    """

    def __init__(self, model: nn.Module, probed=(), min_share: float = DEFAULT_MIN_SHARE) -> None:
        self._mode = _CensusMode(_param_owners(model))
        self._probed, self._min_share = frozenset(probed), min_share
        self.result: GemmCensus | None = None
        self._handles = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave)]

    def _enter(self, module, args) -> None:
        self._mode.__enter__()

    def _leave(self, module, args, out) -> None:
        self._mode.__exit__(None, None, None)
        self.result = GemmCensus(self._mode.sites, self._probed, self._min_share)
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def gemm_census(model: nn.Module, *args, probed=(), min_share: float = DEFAULT_MIN_SHARE, **kwargs) -> GemmCensus:
    """Run ``model(*args, **kwargs)`` once (no grad) and return the census of its GEMMs."""
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"min_share={min_share} must be in [0, 1), e.g. 0.01 (1% of the step's GEMM FLOPs)")
    mode = _CensusMode(_param_owners(model))
    with torch.no_grad(), mode:
        model(*args, **kwargs)
    return GemmCensus(mode.sites, frozenset(probed), min_share)
