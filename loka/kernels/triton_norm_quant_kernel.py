"""Triton kernel of the fused LayerNorm/RMSNorm + FP8 rowwise quantize (API: triton_norm_quant.py).

One program owns BLOCK_M whole rows: it reads them once, normalizes them in
registers (fp32 statistics, affine weight/bias), and since a normalized row is
complete in registers its amax is known there too; it writes the FP8 row and
its dequant scale and nothing else (the optional ``y_hp`` output exists for
tests). Imports triton at top level; imported lazily.
"""

from __future__ import annotations

import triton
import triton.language as tl

from loka.kernels.triton_fp8_jit import (
    finite_abs,
    fp8_encode_emulated,
    fp8_round_emulated,
    fp8_scale_and_clamp,
    fp8_scale_from_amax,
)


@triton.jit
def _normalize(x, mask, N, eps, IS_RMS: tl.constexpr):
    """Rows of x normalized with fp32 statistics (biased variance, like torch). [BLOCK_M, BLOCK_N]"""
    if IS_RMS:
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None]
    return y


@triton.jit
def norm_quant_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, scale_ptr, y_hp_ptr,
    M, N, stride_xm, stride_om, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_HP: tl.constexpr,
    POW2: tl.constexpr, EMULATE: tl.constexpr,
    FMAX: tl.constexpr, RCP_FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EXP_BIAS: tl.constexpr,
    NAN_BYTE: tl.constexpr, INF_BYTE: tl.constexpr, FP8_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """x[M, N] (row stride stride_xm, unit column stride) -> out[M, N] fp8, scale[M] fp32."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _normalize(x, mask, N, eps, IS_RMS)
    if HAS_W:
        y = y * tl.load(w_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = tl.where(mask, y, 0.0)
    if STORE_HP:
        tl.store(y_hp_ptr + rm[:, None] * N + rn[None, :], y, mask=mask)

    scale = fp8_scale_from_amax(tl.max(finite_abs(y), axis=1), RCP_FMAX, POW2)
    q = fp8_scale_and_clamp(y, scale[:, None], FMAX, POW2)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if EMULATE:
        # out_ptr is the FP8 output viewed as uint8: the byte is built by hand.
        q = fp8_round_emulated(q, MBITS, EMIN)
        tl.store(out_ptrs, fp8_encode_emulated(q, MBITS, EMIN, EXP_BIAS, NAN_BYTE, INF_BYTE), mask=mask)
    else:
        tl.store(out_ptrs, q.to(FP8_DTYPE), mask=mask)
    tl.store(scale_ptr + rm, scale, mask=rm < M)
