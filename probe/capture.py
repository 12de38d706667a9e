"""Capturing the operands of a site's three GEMMs on a sampled step.

On a sampled step each active site gets one forward hook. It records the input
``x`` and the weight ``W`` (detached copies: the optimizer may update ``W`` in place
before the step ends) and registers a tensor hook on the output that records the
output gradient ``dy`` when backward reaches it. A tensor hook observes the gradient
and returns nothing, so autograd's numerics are untouched, and nothing is recorded
when there is no backward (evaluation) or the output does not require grad.

Large operands are row-sampled at capture time: at most ``capture_rows`` random rows of
``x`` are copied, and the same rows of ``dy`` (so wgrad's pairing of x and dy rows holds).
The element count, non-finite count and amax are still taken over the whole tensor
(three reductions, no copy), so non-finite values are never missed. This bounds both
the memory and the analysis cost of a sampled step at large batch sizes.

Every forward call of a site is one *micro-batch* record ``(x, W, dy)``; gradient
accumulation (several forward/backward pairs per step) and a module called several
times per forward simply give several records, each paired with its own ``dy``.
Hooks are removed when the step ends, so unsampled steps run no probe code at all.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class MicroBatch:
    """One forward call of a site: operands in the GEMM layout, reduction dim last."""

    x: torch.Tensor  # [m, K] input rows kept (m <= M), as the GEMM saw them (bf16 under autocast)
    w: torch.Tensor  # [N, K] weight, in the dtype the GEMM used
    m: int  # M, the rows of the whole input
    x_full: torch.Tensor  # [numel, nonfinite, finite amax] of the whole input (float64)
    rows: torch.Tensor | None = None  # kept row indices, None when all rows are kept
    dy: torch.Tensor | None = None  # [m, N] output gradient rows, None until/unless backward ran
    dy_full: torch.Tensor | None = None


def exact_counts(t: torch.Tensor) -> torch.Tensor:
    """``[numel, nonfinite, finite amax]`` of ``t`` as a float64 tensor on ``t``'s device.

    No device sync on accelerators. On CPU (where a sync is free) one reduction settles the
    common all-finite case: ``amax(|t|)`` is NaN or Inf exactly when a value is.
    """
    if t.device.type == "cpu" and t.numel():
        amax = t.abs().amax().double()
        if bool(torch.isfinite(amax)):
            return torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64), amax.new_zeros(()), amax])
    finite = torch.isfinite(t)
    amax = torch.where(finite, t.abs(), torch.zeros((), dtype=t.dtype, device=t.device)).amax() if t.numel() else t.new_zeros(())
    return torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device),
                        (~finite).sum().double(), amax.double()])


@dataclass
class StepCapture:
    """Everything captured at the active sites during one sampled step."""

    step: int
    capture_rows: int = 1 << 62
    seed: int = 0
    records: dict[str, list[MicroBatch]] = field(default_factory=dict)
    hook_seconds: float = 0.0  # time spent inside the hooks (probe cost paid during the step)
    handles: list[RemovableHandle] = field(default_factory=list)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _gemm_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the GEMM ran in: autocast's dtype when active, else the input's."""
    dev = x.device.type
    if hasattr(torch, "is_autocast_enabled") and _autocast_on(dev):
        return torch.get_autocast_dtype(dev) if hasattr(torch, "get_autocast_dtype") else torch.bfloat16
    return x.dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older signature without a device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _forward_hook(fqn: str, capture: StepCapture):
    def hook(module: nn.Module, args: tuple, output) -> None:
        t0 = time.perf_counter()
        try:
            _capture_forward(module, args, output)
        finally:
            capture.hook_seconds += time.perf_counter() - t0

    def _capture_forward(module: nn.Module, args: tuple, output) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        x = args[0].detach()
        dtype = _gemm_dtype(x, module.weight)
        x2d = x.reshape(-1, x.shape[-1])
        records = capture.records.setdefault(fqn, [])
        rows = _kept_rows(x2d.shape[0], capture, fqn, len(records))
        kept = x2d.to(dtype, copy=True) if rows is None else x2d[rows.to(x2d.device)].to(dtype)
        w = module.weight.detach().to(dtype, copy=True)
        rec = MicroBatch(x=kept, w=w, m=int(x2d.shape[0]), x_full=exact_counts(x2d.to(dtype)), rows=rows)
        records.append(rec)
        if output.requires_grad and torch.is_grad_enabled():
            output.register_hook(_grad_hook(rec, capture))

    return hook


def _grad_hook(rec: MicroBatch, capture: StepCapture):
    def hook(grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dy2d = grad.detach().reshape(-1, grad.shape[-1])
        dy = dy2d.clone() if rec.rows is None else dy2d[rec.rows.to(dy2d.device)]
        rec.dy_full = exact_counts(dy2d)
        rec.dy = dy  # a tensor hook sees the total gradient of the output, once per backward
        capture.hook_seconds += time.perf_counter() - t0
        return None

    return hook


def _kept_rows(m: int, capture: StepCapture, fqn: str, call: int) -> torch.Tensor | None:
    if m <= capture.capture_rows:
        return None
    # Seeded by (seed, step, site, call) so reruns sample the same rows; the global RNG is untouched.
    key = f"{capture.seed}/{capture.step}/{fqn}/{call}".encode()
    g = torch.Generator().manual_seed(zlib.crc32(key))
    return torch.randperm(m, generator=g)[: capture.capture_rows].sort().values


def install(sites: dict[str, nn.Module], step: int, capture_rows: int | None = None, seed: int = 0) -> StepCapture:
    """Hook every module in ``sites`` (fqn -> module) for one step; call ``remove_hooks`` after."""
    capture = StepCapture(step=step, capture_rows=capture_rows or (1 << 62), seed=seed)
    for fqn, module in sites.items():
        capture.handles.append(module.register_forward_hook(_forward_hook(fqn, capture)))
    return capture
