"""Autograd of the fused norm+quantize block: one function from the norm's input to the Linear's output.

The block (loka.mods.fused_norm_quant) defers the norm into the Linear's call, so one
``torch.autograd.Function`` covers both modules and nothing passes between them in Python:

- forward: the fused norm + rowwise FP8 cast of the norm input ``x`` (Triton kernel or its
  PyTorch reference; the kernel itself is forward-only, so it runs on detached inputs), then
  fprop on the pre-quantized ``(y_fp8, scale)``;
- backward: dgrad exactly as ``Float8Linear`` (its result is the gradient of the norm's
  output ``y``), wgrad on ``y`` recomputed from the saved ``x`` in the dtype the unfused norm
  produces (float32 LayerNorm output under CUDA autocast, ``x.dtype`` without it), and the
  norm's own backward by autograd on that same recompute (one recompute serves both).

It recomputes ``y`` with the same PyTorch norm and the same autocast state as the unfused
block, so the gradients equal the unfused Norm -> Float8Linear's bit for bit. It keeps no
Python state between calls (everything lives on ``ctx``), so torch.compile traces it whole:
forward and backward stay in one graph each.

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

from loka.weight_cache import function_output


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


def recompute(norm, state, x, weight, bias):
    """``y`` as the unfused ``norm`` gives it under autocast ``state`` (no grad)."""
    with torch.no_grad(), _autocast(state):
        return hp_norm(x, weight, bias, norm.kind, norm.normalized_shape, norm.hp_eps)


def recompute_with_vjp(norm, state, x, weight, bias, needs):
    """``(y, vjp)``: ``y`` as in :func:`recompute`, and ``vjp(dy)`` -> the gradients of the inputs
    marked in ``needs`` (x, weight, bias), by PyTorch's own norm backward. ``torch.func.vjp``
    rather than ``torch.autograd.grad``, which torch.compile cannot trace inside a backward."""
    args = [_detached(t) for t in (x, weight, bias)]
    picked = [i for i, n in enumerate(needs) if n]

    def norm_of(*primals):
        full = list(args)
        for i, p in zip(picked, primals):
            full[i] = p
        with _autocast(state):
            return hp_norm(*full, norm.kind, norm.normalized_shape, norm.hp_eps)

    return torch.func.vjp(norm_of, *(args[i] for i in picked))


def _detached(t):
    return None if t is None else t.detach()


class NormQuantLinearFn(torch.autograd.Function):
    """out = quantize(norm(x)) · Wᵀ, the FP8 activation made by the fused norm kernel;
    backward: dgrad/wgrad as ``_Float8LinearFn``, then the hp norm's exact backward."""

    @staticmethod
    def forward(ctx, x2d, n_weight, n_bias, weight, norm, module, compute_dtype, state):
        ctx.norm, ctx.module, ctx.compute_dtype, ctx.state = norm, module, compute_dtype, state
        ctx.weight_is_param = weight is module.weight
        ctx.save_for_backward(x2d, n_weight, n_bias, weight)
        w_param = weight if ctx.weight_is_param else None
        y_fp8, scale = norm.quantize(x2d.detach(), _detached(n_weight), _detached(n_bias))
        out = module.fprop_prequantized(y_fp8, scale, weight, compute_dtype, weight_param=w_param)
        if out is None:  # the kernel cannot take this shape: the unfused fprop (raises or runs hp)
            y = recompute(norm, state, x2d, n_weight, n_bias)
            out = module.run_gemm("fprop", y, weight, compute_dtype, weight=w_param)
        return function_output(out)  # a view under compile: torch 2.11 loses the gradient otherwise

    @staticmethod
    def backward(ctx, dy):
        x2d, n_weight, n_bias, weight = ctx.saved_tensors
        module, dt = ctx.module, ctx.compute_dtype
        needs = tuple(n and t is not None for n, t in zip(ctx.needs_input_grad[:3], (x2d, n_weight, n_bias)))
        if any(needs):  # the single recompute: wgrad's operand and the norm's backward
            y, vjp = recompute_with_vjp(ctx.norm, ctx.state, x2d, n_weight, n_bias, needs)
        else:
            y, vjp = recompute(ctx.norm, ctx.state, x2d, n_weight, n_bias), None
        dy_norm = dw = None
        if vjp is not None:  # dgrad first, as the unfused block runs it
            w_param = module.weight if ctx.weight_is_param else None
            dy_norm = module.run_gemm("dgrad", dy, weight.t(), dt, weight=w_param).to(y.dtype)
        if ctx.needs_input_grad[3]:
            dw = module.run_gemm("wgrad", dy.t().contiguous(), y.detach().t().contiguous(), dt).to(weight.dtype)
        grads = [None, None, None]
        if vjp is not None:  # the norm's backward, on the same recompute
            got = iter(vjp(dy_norm))
            grads = [next(got) if n else None for n in needs]
        return (*grads, dw, None, None, None, None)
