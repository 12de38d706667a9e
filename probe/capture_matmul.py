"""Capturing ``x @ W`` sites: GEMMs on a 2-D parameter that no module hook can see.

A cross network's ``x @ self.W`` or AutoInt's ``einsum("bfe,ed->bfd", x, self.W_q)`` is
a GEMM ``y[M, N] = x[M, K] · (Wᵀ)[N, K]ᵀ`` with the parameter ``W[K, N]`` as the weight,
but it runs inside its owner's forward, so it has no module of its own to hook. During a
sampled step a ``TorchFunctionMode`` (entered and left by forward hooks on the model's
root) sees those calls (the same ones ``loka.convert_gemms`` converts, by the same test)
and records them like a Linear's: sampled input rows, the weight as ``[N, K]``, and the
output gradient from a tensor hook. The site is named by the parameter's fqn, as the
census names it. Steps that are not sampled install nothing.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from loka.convert_gemms import param_matmul_operands
from loka.probe.capture import StepCapture, _grad_hook, record_forward
from loka.probe.sites import is_gemm_module

_NOT_GEMM_WEIGHTS = (nn.Embedding, nn.EmbeddingBag)


def matmul_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """``{id(W): (fqn, W)}`` for every 2-D parameter that is not a module site's or a table's weight."""
    out = {}
    for mod_fqn, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.dim() != 2 or id(p) in out:
                continue
            if name == "weight" and (is_gemm_module(mod) or isinstance(mod, _NOT_GEMM_WEIGHTS)):
                continue
            out[id(p)] = (f"{mod_fqn}.{name}" if mod_fqn else name, p)
    return out


class _WeightView:
    """What ``record_forward`` reads of a site: its weight as ``[N, K]`` (Wᵀ, a view)."""

    def __init__(self, w: nn.Parameter) -> None:
        self.weight = w.t()


class _MatmulCaptureMode(TorchFunctionMode):
    def __init__(self, capture: StepCapture, params: dict[int, str]) -> None:
        super().__init__()
        self.capture, self.params = capture, params
        self.shapes: dict[str, tuple[int, int]] = {}  # fqn -> (K, N) of the sites seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        hit = param_matmul_operands(func, args, kwargs, self.params)
        if hit is None or not isinstance(out, torch.Tensor):
            return out
        x, w, fqn = hit
        t0 = time.perf_counter()
        try:
            rec = record_forward(self.capture, fqn, _WeightView(w), x)
            self.shapes[fqn] = (int(w.shape[0]), int(w.shape[1]))
            if out.requires_grad and torch.is_grad_enabled():
                out.register_hook(_grad_hook(rec, self.capture))
        finally:
            self.capture.hook_seconds += time.perf_counter() - t0
        return out


def install_matmul(root: nn.Module, capture: StepCapture, params: dict[int, str]) -> _MatmulCaptureMode | None:
    """Capture ``params``' ``x @ W`` calls during ``root``'s forwards this step (handles go to ``capture``)."""
    if not params:
        return None
    mode = _MatmulCaptureMode(capture, params)

    def enter(module, args) -> None:  # a pre-hook's return value would replace the inputs
        mode.__enter__()

    def leave(module, args, out) -> None:
        mode.__exit__(None, None, None)

    capture.handles.append(root.register_forward_pre_hook(enter))
    capture.handles.append(root.register_forward_hook(leave, always_call=True))
    return mode
