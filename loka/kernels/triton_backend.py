"""``triton`` kernels: loka's own FP8 GEMM with the activation's quantization fused in.

Adapts ``fp8_mm_fused_quant`` (triton_gemm.py) to the ``GemmKernel`` interface
so the registry, the shared correctness test and the plan can use it:

- ``a`` (the hp operand: input for fprop, grad_output for dgrad and wgrad) is
  quantized inside the kernel, rowwise or tensorwise, dynamic or with a given
  (delayed/static) scale;
- ``b`` is quantized here with ``loka.quantize`` unless it comes pre-quantized
  (a cached FP8 weight, the serving case), then read as FP8 by the kernel.

Takes tensorwise and rowwise recipes (any mix of the two between a and b),
e4m3/e5m2 on either side, any M, K, N (tiles are masked; no alignment rule).
Does not take ``nonfinite="raise"`` on a (the fused kernel skips NaN/Inf for
the amax and cannot raise without a separate pass over a) nor blockwise/MX.
Runs on CUDA sm_89+ (compiled, autotuned) and on CPU under TRITON_INTERPRET=1.

Where it should pay: fprop and dgrad of small/skinny sites (K <= 256 quantizes
a once per program). wgrad's a is dyᵀ, a transposed view whose reduction dim
is the batch: it is read with strided loads and K is large, so expect it slow
there; the micro-benchmarks decide per site.

Not a default candidate (``not_default``): measured on one H200 on 2026-11-30
(bench/results/h200_2026-11-30_gemm_triton.md, ``bench/gemm_triton.py``) it ran at
0.21-0.25x of bf16 and at 0.29-0.78x of scaled_mm with a compiled cast at all five
ranker shapes (A re-quantized by every N tile, an unpipelined amax sweep, not
persistent). The planner, probe and micro-benchmarks consider it only when named
(``kernels=["triton"]``), until a redesign beats ``torch._scaled_mm`` there.
"""

from __future__ import annotations

import torch

from loka.quantize import quantize_operand
from loka.recipe import GemmRecipe

from loka.kernels.kernel import (
    NVIDIA_FP8_ARCHS, OCP_FP8, YES, GemmKernel, Quantized, Shape, Support, check_operands, formats_problem, no,
)
from loka.kernels.triton_gemm import fp8_mm_fused_quant, triton_available

GRANULARITIES = ("tensorwise", "rowwise")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class TritonFusedQuantKernel(GemmKernel):
    """Triton FP8 GEMM, a quantized in the kernel, float32 accumulation."""

    name = "triton"
    backend = "triton"
    fuses_a_cast = True
    modelled = True
    archs = NVIDIA_FP8_ARCHS
    fast_accum = False
    not_default = ("measured 0.21-0.25x of bf16 on an H200 (bench/results/h200_2026-11-30_gemm_triton.md); "
                   "considered only when named, e.g. kernels=['triton']")

    def available(self, device=None) -> Support:
        ok, reason = triton_available(device)
        return YES if ok else no(reason)

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        if recipe.is_hp:
            return no("triton runs FP8 GEMMs only; this GEMM is hp")
        for side, op in (("a", recipe.a), ("b", recipe.b)):
            if op.is_hp:
                return no(f"triton needs both operands in FP8; {side} is hp")
            if op.granularity not in GRANULARITIES:
                return no(f"triton takes tensorwise or rowwise scaling, {side} is {op.granularity}")
        problem = formats_problem(recipe, OCP_FP8, "triton")
        if problem:
            return no(problem)
        if recipe.a.nonfinite == "raise":
            return no("triton skips NaN/Inf inside the kernel and cannot honour nonfinite='raise' on a")
        if dtype not in DTYPES:
            return no(f"triton takes bf16/fp16/fp32 activations, got {dtype}")
        return YES

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        m, k, n = check_operands(a, b)
        ok, reason = self.supports(recipe, (m, k, n), a.dtype, a.device)
        if not ok:
            raise ValueError(f"triton cannot run this GEMM [M={m}, K={k}, N={n}]: {reason}")
        if isinstance(b, Quantized):
            b_fp8, sb = b.data, b.scale
        else:
            b_fp8, sb = quantize_operand(b, recipe.b, scale_b)
        if recipe.a.granularity == "rowwise" and scale_a is not None and scale_a.numel() == 1:
            scale_a = scale_a.reshape(1, 1).expand(m, 1)  # a per-tensor delayed/static scale on rowwise
        return fp8_mm_fused_quant(
            a, b_fp8, sb, a_format=recipe.a.format, granularity=recipe.a.granularity, a_scale=scale_a,
            pow2_scale=recipe.a.pow2, out_dtype=out_dtype or a.dtype, fast_accum=self.fast_accum,
        )


class TritonFusedQuantFastAccumKernel(TritonFusedQuantKernel):
    """The Triton kernel with Hopper's fast (reduced-precision) FP8 accumulation."""

    name = "triton_fast_accum"
    modelled = False  # priced as triton
    fast_accum = True
