"""The inputs of a headroom estimate: every GEMM call of one training step and the work around it.

``loka.dispatch.headroom`` answers "what can FP8 buy this model?" from the shapes alone, so the
census is taken on fake tensors (``FakeTensorMode``: shapes, no storage): a ranker of any size at
any batch costs seconds on a CPU. One forward is recorded:

- every ``nn.Linear`` call: its fqn and [M, K] · [N, K]ᵀ (a training step runs fprop, dgrad, wgrad);
- every ``bmm`` outside a Linear (an FM interaction's XᵀX): batch x [M, K] · [K, N], kept in bf16
  (loka converts no activation x activation GEMM), run three times a step like a Linear;
- the FLOPs of fused attention kernels (QKᵀ and AV), and embedding rows gathered;
- the bytes every other (non-view) op reads and writes: eager elementwise work (norms, activations,
  casts, concatenations), and the floor compile fusion could reach: each GEMM's input written once
  and its output read once.

The model's own code says what the census cannot see (which blocks are checkpointed, attention
over jagged sequences that a fake run cannot size): the caller passes it in
(``loka.models.headroom_inputs`` does it for the bundled ranker; ``model_census`` for any model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

from loka.mods.graph import run_sample

_aten = torch.ops.aten
_BMM = {_aten.bmm.default: (0, 1), _aten.baddbmm.default: (1, 2)}
_MM = {_aten.mm.default, _aten.addmm.default, *_BMM}
_FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "slice",
         "select", "alias", "detach", "empty", "empty_like", "zeros", "ones", "full", "arange", "as_strided",
         "split", "split_with_sizes", "unbind", "lift_fresh", "new_empty", "new_empty_strided", "empty_strided"}
_FILLS = ("new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "fill")  # write, read nothing
_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention")


@dataclass(frozen=True)
class GemmSite:
    """One GEMM call of a forward: ``batch`` x [M, K] · [N, K]ᵀ, named by its owner's fqn."""

    fqn: str
    m: int
    k: int
    n: int
    kind: str = "linear"  # linear | bmm
    batch: int = 1
    recomputed: bool = False  # its forward runs again in backward (activation checkpointing)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "bmm"):
            raise ValueError(f"GemmSite.kind={self.kind!r}: use 'linear' or 'bmm'")
        if min(self.m, self.k, self.n, self.batch) < 1:
            raise ValueError(f"GemmSite {self.fqn}: M, K, N and batch must be >= 1, got "
                             f"{(self.batch, self.m, self.k, self.n)}")

    @property
    def arch(self) -> str:
        """The site's group: the first component of its fqn (``interaction``, ``sequence``, ...)."""
        return self.fqn.split(".")[0]


@dataclass(frozen=True)
class StepCensus:
    """Everything a headroom estimate prices, for one training step of one model at one batch."""

    sites: tuple[GemmSite, ...]
    label: str  # what was recorded, e.g. "ranker large, batch 8192 (fake tensors)"
    attention_fwd_flops: float = 0.0  # inside a fused attention kernel, forward only
    attention_recomputed: bool = False  # checkpointing runs attention's forward again
    dense_params: int = 0  # updated by AdamW every step (fp32 param, grad, two states)
    embedding_lookups: int = 0  # rows gathered in forward and updated in backward
    embedding_dim: int = 0
    embedding_bytes: int = 4  # bytes per table element
    elementwise_fwd_bytes: float = 0.0  # read + written by eager non-GEMM ops in one forward
    fused_fwd_bytes: float = 0.0  # the floor with every elementwise chain fused (GEMM inputs/outputs once)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("StepCensus has no GEMM sites: record a forward that runs the model's Linears")
        for f in ("attention_fwd_flops", "dense_params", "embedding_lookups", "embedding_dim",
                  "elementwise_fwd_bytes", "fused_fwd_bytes"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"StepCensus.{f}={getattr(self, f)} must be >= 0")

    def linears(self) -> list[GemmSite]:
        return [s for s in self.sites if s.kind == "linear"]

    def without(self, *kinds: str) -> "StepCensus":
        """The same census without the sites of ``kinds`` (e.g. ``"bmm"``: as the 2026-12-07 audit priced it)."""
        return replace(self, sites=tuple(s for s in self.sites if s.kind not in kinds))


class _StepRecorder(TorchDispatchMode):
    """bmm calls outside a Linear, and the bytes of every other op that computes something."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = ModuleTracker()
        self.in_linear = 0
        self.bmms: list[tuple[str, int, int, int, int]] = []
        self.elementwise_bytes = 0.0
        self.embedding = {"embedding_lookups": 0, "embedding_dim": 0, "embedding_bytes": 4}
        self.attention_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func in _BMM and not self.in_linear:
            a, b = args[_BMM[func][0]], args[_BMM[func][1]]  # [B, M, K] · [B, K, N]
            owner = max(self.tracker.parents, key=lambda p: p.count("."))  # the innermost module
            fqn = owner.split(".", 1)[1] if "." in owner else "(root)"  # drop the root's class name
            self.bmms.append((fqn, int(a.shape[0]), int(a.shape[1]), int(a.shape[2]), int(b.shape[2])))
        elif "embedding" in name and "backward" not in name:  # (weight [rows, D], ids, ...): rows gathered
            weight, ids = args[0], args[1]
            self.embedding["embedding_lookups"] += int(ids.numel())
            self.embedding.update(embedding_dim=int(weight.shape[-1]), embedding_bytes=weight.element_size())
        elif any(t in name for t in _ATTENTION) and "backward" not in name:
            q, k, v = args[0], args[1], args[2]  # [B, H, L, E], [B, H, S, E], [B, H, S, Ev]: QKᵀ and AV
            self.attention_flops += 2.0 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        elif (func not in _MM and name not in _FREE and _bytes(out) > 0  # metadata queries return no tensor
              and not any(t in name for t in _ATTENTION)):
            self.elementwise_bytes += _bytes(out) + (0.0 if name.startswith(_FILLS) else _bytes(args))
        return out


def _bytes(obj) -> float:
    if isinstance(obj, torch.Tensor):
        return float(obj.numel() * obj.element_size())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(o) for o in obj)
    return 0.0


def record_gemms(model: nn.Module, forward, recomputed=lambda fqn: False) -> dict:
    """Run ``forward()`` (one forward of ``model``, under the caller's fake mode) and return the
    ``StepCensus`` fields it sees: ``sites``, ``elementwise_fwd_bytes``, ``fused_fwd_bytes``, the FLOPs
    of fused attention kernels (``scaled_dot_product_attention``) and the embedding lookups. ``recomputed(fqn)``: whether the site's forward runs again in backward."""
    names = {m: n for n, m in model.named_modules()}
    sites: list[GemmSite] = []
    rec = _StepRecorder()

    def enter(module, args):
        rec.in_linear += 1

    def leave(module, args, out):
        rec.in_linear -= 1
        fqn = names[module]
        sites.append(GemmSite(fqn, args[0].numel() // module.in_features, module.in_features, module.out_features,
                              recomputed=bool(recomputed(fqn))))

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(enter) for m in linears] + [m.register_forward_hook(leave) for m in linears]
    try:
        with rec.tracker, rec:
            forward()
    finally:
        for h in handles:
            h.remove()
    sites += [GemmSite(fqn, m, k, n, kind="bmm", batch=b, recomputed=bool(recomputed(fqn)))
              for fqn, b, m, k, n in rec.bmms]
    fused = sum(2.0 * (s.m * s.k + s.m * s.n) for s in sites if s.kind == "linear")  # bf16 in, bf16 out
    return {"sites": tuple(sites), "elementwise_fwd_bytes": rec.elementwise_bytes, "fused_fwd_bytes": fused,
            "attention_fwd_flops": rec.attention_flops, **rec.embedding}


def model_census(model: nn.Module, sample, label: str, recomputed=lambda fqn: False) -> StepCensus:
    """The census of one training step of any ``model`` on ``sample`` (a tuple is unpacked, a dict passed
    as kwargs): run it on fake tensors (``FakeTensorMode``) for a model too large to run here.
    Every parameter that requires grad is counted as AdamW-updated."""
    def forward():
        with torch.no_grad():
            run_sample(model, sample)

    rec = record_gemms(model, forward, recomputed)
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dim() > 0)
    return StepCensus(label=label, dense_params=dense, **rec)
