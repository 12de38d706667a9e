"""The two kernels every machine has: ``bf16`` (the hp fallback) and ``emulated``.

``emulated`` defines what an FP8 recipe computes: quantize both operands with
loka.quantize, dequantize, and multiply in float32 (the accumulation precision
of FP8 tensor cores). Every real kernel is tested against it.
"""

from __future__ import annotations

import torch

from loka.quantize import dequantize, fake_quantize, operand_block
from loka.recipe import GemmRecipe

from loka.kernels.kernel import YES, GemmKernel, Quantized, Shape, Support, check_operands, no, quantized_out_dtype


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class Bf16Kernel(GemmKernel):
    """High-precision GEMM in the operands' dtype (bf16 under autocast, else as given)."""

    name = "bf16"
    backend = "bf16"
    hp = True

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        return YES if recipe.is_hp else no("bf16 runs hp GEMMs only; this recipe quantizes")

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        if isinstance(b, Quantized):
            raise ValueError("the bf16 kernel takes a high-precision b, not a pre-quantized one")
        check_operands(a, b)
        out_dtype = out_dtype or a.dtype
        with _no_autocast(a.device.type):
            return (a @ b.to(a.dtype).t()).to(out_dtype)


class EmulatedKernel(GemmKernel):
    """Reference FP8 GEMM: quantize -> dequantize -> float32 matmul. Any recipe, any shape."""

    name = "emulated"
    backend = "emulated"
    takes_quantized_a = True
    reference = True
    auto_rank = 1

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        return YES

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        check_operands(a, b)
        out_dtype = out_dtype or quantized_out_dtype(a)
        a_dq = _dequantized(a, recipe.a, scale_a)
        b_dq = _dequantized(b, recipe.b, scale_b)
        with _no_autocast(a_dq.device.type):
            return (a_dq @ b_dq.t()).to(out_dtype)


def _dequantized(x, op, scale) -> torch.Tensor:
    """float32 ``x`` as the GEMM sees it: a pre-quantized operand dequantized, an hp one fake-quantized."""
    if isinstance(x, Quantized):
        return dequantize(x.data, x.scale, block=operand_block(op, x.data.shape))
    return fake_quantize(x.float(), op, scale)
