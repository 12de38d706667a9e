"""GEMM census: every GEMM a model's step runs, its owner, its FLOPs and whether loka converts it.

Models written by others run GEMMs as ``x @ self.W``, ``torch.tensordot``, ``einsum``,
``torch.matmul(self.kernels[i], x)``, ``F.linear``, ``nn.MultiheadAttention`` and 1x1
convolutions, not only as Linears. The census is what :class:`loka.aten_gemms.GemmObserver`
sees at the ATen level, the same observation ``loka.convert`` verifies with: every
``mm``/``addmm``/``bmm``/``baddbmm``/``convolution`` (and a fused attention kernel), named by
the parameter one of its operands views or copies (autocast's bf16 weight counts as the
parameter), backward GEMMs included when the census spans the backward (the probe's step,
``gemm_census(..., backward=True)``). Without a backward the step is estimated as 3x the
forward (fprop, dgrad and wgrad have the same FLOPs).

A GEMM is *convertible* when its form is one loka's engines run in FP8 (a Linear, a 1x1
convolution, any product with one parameter operand that is one matrix after its view, or a
stack of at most ``MAX_BATCH_LOOP`` matrices); otherwise the census names why. Sites that are
convertible but hold less than ``min_share`` of the step (an ``N=1`` head is typically
0.01-0.5%) are reported as not worth converting: FP8 cannot win time back on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loka.aten_gemms import NO_PARAM, GemmObserver, ParamIndex, SiteCount, param_sites

DEFAULT_MIN_SHARE = 0.01


@dataclass
class CensusSite:
    """One site of the census: a parameter (or none) and the GEMMs that used it in one step."""

    site: str
    kind: str  # linear | conv1x1 | conv | matmul | activation
    param: str | None
    calls: int = 0  # forward GEMM calls
    forward_flops: float = 0.0
    step_flops: float = 0.0  # forward and backward, as observed (3x forward when no backward was seen)
    convertible_flops: float = 0.0
    why_not: dict = field(default_factory=dict)  # why some of its GEMMs are not convertible -> count
    shapes: list = field(default_factory=list)  # [(M, K, N)] per forward call (first few)

    @property
    def n(self) -> int | None:
        return self.shapes[0][2] if self.shapes else None

    @property
    def k(self) -> int | None:
        return self.shapes[0][1] if self.shapes else None


def _kinds(model: nn.Module) -> dict[str, tuple[str, str]]:
    """site -> (kind, parameter fqn) for every parameter site of ``model``."""
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    out = {}
    for full, (site, p) in param_sites(model).items():
        mod = owners[id(p)]
        if isinstance(mod, nn.Linear):
            kind = "linear"
        elif isinstance(mod, nn.modules.conv._ConvNd) and full.endswith("weight"):
            kind = "conv1x1" if all(k == 1 for k in mod.kernel_size) and mod.groups == 1 else "conv"
        else:
            kind = "matmul"
        out.setdefault(site, (kind, full))
    return out


def _site(name: str, count: SiteCount, kinds: dict, backward: bool) -> CensusSite:
    kind, param = kinds.get(name, ("matmul", None)) if name != NO_PARAM else ("activation", None)
    scale = 1.0 if backward else 3.0  # without a backward: fprop, dgrad and wgrad have the same FLOPs
    return CensusSite(name, kind, param, calls=count.fp8["fprop"] + count.hp["fprop"], forward_flops=count.fprop_flops,
                      step_flops=scale * count.flops, convertible_flops=scale * count.convertible_flops,
                      why_not=dict(count.why_not), shapes=list(count.fprop_shapes))


def census_of(observer: GemmObserver, model: nn.Module, *, backward: bool, probed=(),
              min_share: float = DEFAULT_MIN_SHARE) -> "GemmCensus":
    """The census of what ``observer`` saw on ``model`` (``backward``: it spanned a backward too)."""
    kinds = _kinds(model)
    sites = {name: _site(name, c, kinds, backward) for name, c in observer.counts.items()}
    return GemmCensus(sites, frozenset(probed), min_share)


def census_observer(model: nn.Module) -> GemmObserver:
    return GemmObserver(ParamIndex({site: p for site, p in param_sites(model).values()}))


@dataclass
class GemmCensus:
    """The census of one step: sites by name, and what loka probes and converts of them."""

    sites: dict[str, CensusSite]
    probed: frozenset = frozenset()  # sites the probe measured (captured records at)
    min_share: float = DEFAULT_MIN_SHARE

    @property
    def step_flops(self) -> float:
        return sum(s.step_flops for s in self.sites.values())

    def share(self, site: str) -> float:
        total = self.step_flops
        return self.sites[site].step_flops / total if total else 0.0

    def convertible(self, s: CensusSite) -> tuple[bool, str]:
        """Whether loka converts all of the site's GEMMs, and why not."""
        if s.kind == "activation":
            return False, "no parameter operand (activation x activation GEMM)"
        if s.convertible_flops >= s.step_flops:
            return True, ""
        return False, "; ".join(s.why_not) or "not a GEMM form loka converts"

    def worth(self, s: CensusSite) -> tuple[bool, str]:
        share = self.share(s.site)
        if share < self.min_share:
            shape = f"N={s.n}, " if s.n is not None and s.n < 16 else ""
            return False, f"not worth converting: {shape}{share:.2%} of the step's GEMM FLOPs (< {self.min_share:.0%})"
        return True, ""

    def summary(self) -> dict:
        """JSON-ready: per site kind, share, shapes, probed / convertible / worth; and the shares in total."""
        total = self.step_flops or 1.0
        rows, worth_share, probed_share = [], 0.0, 0.0
        conv_share = sum(s.convertible_flops for s in self.sites.values() if s.kind != "activation") / total
        for name in sorted(self.sites, key=lambda n: -self.sites[n].step_flops):
            s = self.sites[name]
            share = self.share(name)
            ok, why = self.convertible(s)
            good, why_not = self.worth(s) if ok else (False, why)
            worth_share += share if good else 0.0
            probed_share += share if name in self.probed else 0.0
            rows.append({"site": name, "kind": s.kind, "param": s.param, "calls": s.calls, "share": share,
                         "convertible_share": s.convertible_flops / total, "shapes": [list(x) for x in s.shapes],
                         "probed": name in self.probed, "convertible": ok, "worth_converting": good,
                         "reason": why_not if not good else ""})
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
    """Takes the census of the next step of ``model``: from its forward (a pre-hook enters the
    observer) to :meth:`close` (the probe's step end), so the backward is counted as it ran.

    The probe installs it on its first sampled step, so the census costs one step.
    """

    def __init__(self, model: nn.Module, probed=(), min_share: float = DEFAULT_MIN_SHARE) -> None:
        self._model, self._observer = model, census_observer(model)
        self._probed, self._min_share = frozenset(probed), min_share
        self._active = False
        self.result: GemmCensus | None = None
        self._handles = [model.register_forward_pre_hook(self._enter)]

    def _enter(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return  # a traced forward runs no Python mode
        for h in self._handles:
            h.remove()
        self._handles = []
        self._observer.__enter__()
        self._active = True

    def close(self, probed=None) -> None:
        """End the census (after the step's backward); ``probed``: the sites the probe really captured."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if not self._active:
            return
        self._active = False
        self._observer.__exit__(None, None, None)
        backward = any(c.fp8["wgrad"] + c.hp["wgrad"] + c.fp8["dgrad"] + c.hp["dgrad"]
                       for c in self._observer.counts.values())
        self.result = census_of(self._observer, self._model, backward=backward,
                                probed=self._probed if probed is None else probed, min_share=self._min_share)

    def remove(self) -> None:
        self.close()


def gemm_census(model: nn.Module, *args, probed=(), min_share: float = DEFAULT_MIN_SHARE, backward: bool = False,
                **kwargs) -> GemmCensus:
    """Run ``model(*args, **kwargs)`` once and return the census of its GEMMs.

    ``backward=False``: no grad, the step estimated as 3x the forward. ``backward=True``: one
    forward and backward of the sum of its floating outputs, counted as they ran (parameter
    gradients are put back as they were).
    """
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"min_share={min_share} must be in [0, 1), e.g. 0.01 (1% of the step's GEMM FLOPs)")
    observer = census_observer(model)
    grads = {p: p.grad for p in model.parameters()}
    try:
        with observer, torch.set_grad_enabled(backward):
            out = model(*args, **kwargs)
            if backward:
                outs = [t for t in torch.utils._pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
                if outs:
                    sum(t.float().sum() for t in outs).backward()
    finally:
        for p, g in grads.items():
            p.grad = g
    return census_of(observer, model, backward=backward, probed=probed, min_share=min_share)
