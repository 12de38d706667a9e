"""Autograd of the fused norm+quantize block: training on the FP8 activation the norm emits.

Two functions, one per module of the block (loka.mods.fused_norm_quant):

- ``NormQuantFn`` (the norm): forward runs the fused norm + rowwise FP8 cast on detached
  inputs (Triton kernel or its PyTorch reference; the kernel itself is forward-only) and
  returns the placeholder, which requires grad so that autograd connects norm -> Linear.
  Backward is the norm's own backward, by autograd on a recomputed high-precision norm.
- ``PrequantLinearFn`` (the Linear): fprop on the pre-quantized ``(y_fp8, scale)``;
  dgrad exactly as ``Float8Linear`` (its result is the gradient of the norm's output);
  wgrad on ``y`` recomputed from the saved norm input, in the dtype the unfused norm
  produces (float32 LayerNorm output under CUDA autocast, ``x.dtype`` without it).

Both recompute ``y`` with the same PyTorch norm and the same autocast state as the
unfused block, so the gradients equal the unfused Norm -> Float8Linear's bit for bit
(one recompute serves both: the Linear's backward, which runs first, leaves its graph
for the norm's backward).

What it costs and saves, per element of the norm input ``x`` (bf16 ``x``, bf16 ``y``;
statistics and weights ignored):

- forward: the norm writes 1 byte of FP8 instead of 2 of ``y``, and fprop reads no
  ``y`` for an amax and a cast (3 bytes moved instead of 9: triton_norm_quant.py);
- memory between forward and backward: ``y`` is not kept (2 bytes per element saved;
  the norm keeps ``x`` either way);
- backward: one extra norm forward (read ``x`` 2, write ``y`` 2 bytes: 4 more), shared by
  wgrad's operand and the norm's backward. Net: about 6 bytes fewer forward, 4 more
  backward, one hp activation less in memory. No GPU figure has been measured.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def hp_norm(x, weight, bias, kind: str, shape: tuple[int, ...], eps):
    """The unfused norm's output (PyTorch's LayerNorm / RMSNorm, so the same bits and grads)."""
    if kind == "layernorm":
        return F.layer_norm(x, shape, weight, bias, eps)
    return F.rms_norm(x, shape, weight, eps)


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """What ``torch.autocast`` is doing now, to recompute the norm under the same rules."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class Produced:
    """What a NormQuantize hands its Linear: the FP8 activation and how to recompute ``y``."""

    def __init__(self, y_fp8, scale, x, weight, bias, norm, state, y_dtype) -> None:
        self.y_fp8, self.scale = y_fp8, scale
        self.x, self.weight, self.bias = x, weight, bias
        self.kind, self.shape, self.eps = norm.kind, norm.normalized_shape, norm.hp_eps
        self.state, self.y_dtype = state, y_dtype
        self.graph = None  # (leaves, y) left by the Linear's backward for the norm's backward

    def recompute(self, x, weight, bias, needs=(False, False, False)):
        """``y`` as the unfused norm gives it; with ``needs``, also its graph from fresh leaves."""
        with torch.enable_grad() if any(needs) else torch.no_grad(), _autocast(self.state):
            leaves = tuple(None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip((x, weight, bias), needs))
            y = hp_norm(*leaves, self.kind, self.shape, self.eps)
        return leaves, y


class NormQuantFn(torch.autograd.Function):
    """placeholder = fused norm+quantize(x); backward: the hp norm's exact backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, quantize, y_dtype):
        """``quantize(x, weight, bias) -> (y_fp8, scale)`` runs on detached inputs (no grad here)."""
        ctx.save_for_backward(x, weight, bias)
        y_fp8, scale = quantize(x.detach(), None if weight is None else weight.detach(),
                                None if bias is None else bias.detach())
        state = autocast_state(x.device.type)
        ctx.produced = Produced(y_fp8, scale, x, weight, bias, module, state, y_dtype)
        placeholder = torch.full((), float("nan"), dtype=y_dtype, device=x.device).expand(x.shape)
        module.handoff.put(placeholder, ctx.produced)
        return placeholder

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        pre = ctx.produced
        graph, pre.graph = pre.graph, None
        if graph is None or tuple(t is not None and t.requires_grad for t in graph[0]) != tuple(
                n and t is not None for t, n in zip((x, weight, bias), needs)):
            graph = pre.recompute(x, weight, bias, needs)
        leaves, y = graph
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else ())
        out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*out, None, None, None)


class PrequantLinearFn(torch.autograd.Function):
    """y = y_fp8 Wᵀ on the handed-off FP8 activation; dgrad/wgrad as ``_Float8LinearFn``."""

    @staticmethod
    def forward(ctx, p2d, weight, x, n_weight, n_bias, module, pre: Produced, compute_dtype):
        ctx.module, ctx.pre, ctx.compute_dtype, ctx.p_dtype = module, pre, compute_dtype, p2d.dtype
        ctx.weight_is_param = weight is module.weight
        ctx.save_for_backward(weight, x, n_weight, n_bias)
        w_param = weight if ctx.weight_is_param else None
        k = p2d.shape[-1]
        out = module.fprop_prequantized(pre.y_fp8.reshape(-1, k), pre.scale.reshape(-1, 1), weight,
                                        compute_dtype, weight_param=w_param)
        if out is None:  # the kernel cannot take this shape: the unfused fprop (raises or runs hp)
            y = pre.recompute(x, n_weight, n_bias)[1].reshape(-1, k)
            out = module.run_gemm("fprop", y, weight, compute_dtype, weight=w_param)
        return out

    @staticmethod
    def backward(ctx, dy):
        weight, x, n_weight, n_bias = ctx.saved_tensors
        module, dt, pre = ctx.module, ctx.compute_dtype, ctx.pre
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_param = module.weight if ctx.weight_is_param else None
            dx = module.run_gemm("dgrad", dy, weight.t(), dt, weight=w_param).to(ctx.p_dtype)
        if ctx.needs_input_grad[1]:
            needs = tuple(t is not None and t.requires_grad for t in (pre.x, pre.weight, pre.bias))
            needs = needs if ctx.needs_input_grad[0] else (False, False, False)
            leaves, y = pre.recompute(x, n_weight, n_bias, needs)
            if any(needs):
                pre.graph = (leaves, y)  # the norm's backward runs next and reuses this recompute
            y2d = y.detach().reshape(-1, y.shape[-1])
            dw = module.run_gemm("wgrad", dy.t().contiguous(), y2d.t().contiguous(), dt).to(weight.dtype)
        return dx, dw, None, None, None, None, None, None
