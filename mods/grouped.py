"""Mod 4b: same-shape Linears on different inputs as one grouped (batched) GEMM.

G Linears of the same shape ``[N, K]`` applied to G different inputs
``x_g [M, K]`` are one grouped GEMM ``out[g] = x[g] · W[g]ᵀ``: one launch
instead of G, with M·G rows of work. ``torch._grouped_mm`` (and its FP8 form
``torch._scaled_grouped_mm``) runs it on builds that have it; elsewhere
``torch.bmm`` is the batched fallback. Both are exact in high precision
(each group's output is the same dot products). :func:`scaled_grouped_linear`
is the FP8 form (``torch._scaled_grouped_mm`` where it runs, else the emulated
quantize -> dequantize -> bmm reference).

A model calls Linears one at a time, and the inputs of later members may not
exist when the first is called, so this cannot be a transparent module swap
(unlike shared-input fusion). :func:`find_groups` lists the candidate groups
from the recorded dataflow; the model's code runs a group by calling
:class:`GroupedLinear` with all inputs at once (e.g. per-task towers, per-
feature projections written as a loop).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn

from loka.mods.graph import Dataflow
from loka.quantize import dequantize, quantize


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``torch._grouped_mm`` runs 3-D x 3-D on this device and dtype (probed once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm is missing from this torch build"
    try:
        a = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(a, a.transpose(-2, -1))
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return False, f"torch._grouped_mm failed here ({str(exc).splitlines()[0][:120]})"
    return True, ""


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """x [G, M, K], weight [G, N, K], bias [G, N] or None -> [G, M, N].

    ``backend``: ``"grouped_mm"``, ``"bmm"`` or ``"auto"`` (grouped_mm where it works).
    """
    if x.dim() != 3 or weight.dim() != 3 or x.shape[0] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f"grouped_linear needs x [G, M, K] and weight [G, N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if backend not in ("auto", "grouped_mm", "bmm"):
        raise ValueError(f"backend={backend!r} is not valid; use 'auto', 'grouped_mm' or 'bmm'")
    use_grouped = backend == "grouped_mm"
    if backend == "auto":
        use_grouped = grouped_mm_works(x.device.type, x.dtype)[0]
    w_t = weight.transpose(-2, -1)  # [G, K, N]
    out = torch._grouped_mm(x, w_t) if use_grouped else torch.bmm(x, w_t)
    return out if bias is None else out + bias.unsqueeze(1)


@functools.lru_cache(maxsize=None)
def scaled_grouped_mm_works(device_type: str) -> tuple[bool, str]:
    """Whether ``torch._scaled_grouped_mm`` runs 3-D x 3-D e4m3 with rowwise scales here (probed once)."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False, "torch._scaled_grouped_mm is missing from this torch build"
    try:
        a = torch.ones(2, 16, 16, device=device_type).to(torch.float8_e4m3fn)
        s = torch.ones(2, 16, device=device_type)
        torch._scaled_grouped_mm(a, a.transpose(-2, -1), s, s, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return False, f"torch._scaled_grouped_mm failed here ({str(exc).splitlines()[0][:120]})"
    return True, ""


def scaled_grouped_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """FP8 (e4m3, rowwise scales) grouped GEMM: x [G, M, K], weight [G, N, K] -> [G, M, N] in x's dtype.

    ``backend``: ``"scaled_grouped_mm"``, ``"emulated"`` (quantize -> dequantize -> bmm,
    the reference) or ``"auto"``.
    """

    if backend not in ("auto", "scaled_grouped_mm", "emulated"):
        raise ValueError(f"backend={backend!r} is not valid; use 'auto', 'scaled_grouped_mm' or 'emulated'")
    x_fp8, s_x = quantize(x, "e4m3", "rowwise")  # [G, M, K], [G, M, 1]
    w_fp8, s_w = quantize(weight, "e4m3", "rowwise")  # [G, N, K], [G, N, 1]
    use = backend == "scaled_grouped_mm" or (backend == "auto" and scaled_grouped_mm_works(x.device.type)[0])
    if use:
        out = torch._scaled_grouped_mm(x_fp8, w_fp8.transpose(-2, -1), s_x.squeeze(-1).contiguous(),
                                       s_w.squeeze(-1).contiguous(), out_dtype=torch.bfloat16)
        return out.to(x.dtype)
    return torch.bmm(dequantize(x_fp8, s_x), dequantize(w_fp8, s_w).transpose(-2, -1)).to(x.dtype)


class GroupedLinear(nn.Module):
    """G Linears of one shape, run together: list of G tensors [..., K] (same shape) -> list of [..., N]."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features, self.backend = groups, in_features, out_features, backend
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(groups, out_features, device=device, dtype=dtype)) if bias else None
        for g in range(groups):
            nn.init.kaiming_uniform_(self.weight[g], a=5**0.5)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], backend: str = "auto") -> "GroupedLinear":
        shapes = {(lin.in_features, lin.out_features, lin.bias is not None) for lin in linears}
        if len(shapes) != 1:
            raise ValueError(f"GroupedLinear needs Linears of one shape and bias-ness, got {sorted(shapes)}")
        k, n, has_bias = shapes.pop()
        w = linears[0].weight
        new = cls(len(linears), k, n, has_bias, backend, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.stack([lin.weight for lin in linears]))
            if has_bias:
                new.bias.copy_(torch.stack([lin.bias for lin in linears]))
        return new

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.groups:
            raise ValueError(f"GroupedLinear has {self.groups} groups, got {len(xs)} inputs")
        lead = xs[0].shape[:-1]
        if any(x.shape != xs[0].shape for x in xs):
            raise ValueError("GroupedLinear inputs must share one shape [..., K]; pad or run them separately")
        x3 = torch.stack([x.reshape(-1, self.in_features) for x in xs])  # [G, M, K]
        out = grouped_linear(x3, self.weight, self.bias, self.backend)  # [G, M, N]
        return [o.reshape(*lead, self.out_features) for o in out.unbind(0)]


def find_groups(flow: Dataflow, min_members: int = 2) -> list[tuple[str, ...]]:
    """Same-shape Linears (K, N, M rows), each called once on a *different* input, none of whose
    input is computed from another member's output (so all inputs can exist before any runs)."""
    by_shape: dict[tuple, list] = defaultdict(list)
    for c in flow.calls:
        if c.kind == "linear" and len(flow.calls_of(c.fqn)) == 1:
            by_shape[(c.in_shape, c.out_shape)].append(c)
    groups = []
    for calls in by_shape.values():
        chosen: list = []
        for c in calls:
            if any(c.input == o.input for o in chosen):
                continue  # shares an input: horizontal fusion's case
            if any(flow.reaches(o.output, {c.input}) or flow.reaches(c.output, {o.input}) for o in chosen):
                continue
            chosen.append(c)
        if len(chosen) >= min_members:
            groups.append(tuple(c.fqn for c in chosen))
    return groups
