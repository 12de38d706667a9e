"""Capturing the operands of a site's three GEMMs on a sampled step.

On a sampled step each active site gets one forward hook. It records the input
``x`` and the weight ``W`` (detached copies: the optimizer may update ``W`` in place
before the step ends) and registers a tensor hook on the output that records the
output gradient ``dy`` when backward reaches it. A tensor hook observes the gradient
and returns nothing, so autograd's numerics are untouched, and nothing is recorded
when there is no backward (evaluation) or the output does not require grad.

Every forward call of a site is one *micro-batch* record ``(x, W, dy)``; gradient
accumulation (several forward/backward pairs per step) and a module called several
times per forward simply give several records, each paired with its own ``dy``.
Hooks are removed when the step ends, so unsampled steps run no probe code at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class MicroBatch:
    """One forward call of a site: operands in the GEMM layout, reduction dim last."""

    x: torch.Tensor  # [M, K] input, as the GEMM saw it (bf16 under autocast)
    w: torch.Tensor  # [N, K] weight, in the dtype the GEMM used
    dy: torch.Tensor | None = None  # [M, N] output gradient, None until/unless backward ran


@dataclass
class StepCapture:
    """Everything captured at the active sites during one sampled step."""

    step: int
    records: dict[str, list[MicroBatch]] = field(default_factory=dict)
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
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        x = args[0].detach()
        dtype = _gemm_dtype(x, module.weight)
        x2d = x.reshape(-1, x.shape[-1]).to(dtype, copy=True)
        w = module.weight.detach().to(dtype, copy=True)
        rec = MicroBatch(x=x2d, w=w)
        capture.records.setdefault(fqn, []).append(rec)
        if output.requires_grad and torch.is_grad_enabled():
            output.register_hook(_grad_hook(rec))

    return hook


def _grad_hook(rec: MicroBatch):
    def hook(grad: torch.Tensor) -> None:
        dy = grad.detach().reshape(-1, grad.shape[-1]).clone()
        rec.dy = dy if rec.dy is None else rec.dy + dy  # output reused twice: grads add up
        return None

    return hook


def install(sites: dict[str, nn.Module], step: int) -> StepCapture:
    """Hook every module in ``sites`` (fqn -> module) for one step; call ``remove_hooks`` after."""
    capture = StepCapture(step=step)
    for fqn, module in sites.items():
        capture.handles.append(module.register_forward_hook(_forward_hook(fqn, capture)))
    return capture
