"""Triton kernels of the fused-quantization FP8 GEMM (see triton_gemm.py for the API).

``out[M, N] = quant(a[M, K]) · b[N, K]ᵀ`` where ``a`` is high precision and
``b`` is already FP8. The point of the fusion: the usual path reads ``a`` once
for its amax, reads it again to cast it, writes an FP8 copy to HBM and reads
that copy in the GEMM. Here each program reads its rows of ``a`` (bf16/fp32)
straight into registers, computes their rowwise amax, scales, casts and feeds
the tensor cores; no FP8 copy of ``a`` exists in memory. When ``K`` fits one
tile (``K <= BLOCK_K``, the common ranker case) ``a`` is read and quantized
once per program and the quantized tile stays in registers while the program
walks ``N_TILES`` tiles of N (so a is quantized ``cdiv(N, BLOCK_N * N_TILES)``
times, not once per output tile). Otherwise a first sweep over K computes the
amax and the second quantizes, per output tile; the second sweep's reads
mostly hit L2 (programs that share rows of ``a`` run together thanks to the
grouped launch order).

Scales are applied once per output in the epilogue: ``acc * scale_a[m] * scale_b[n]``.
With ``A_IS_FP8`` the same kernel multiplies an ``a`` quantized beforehand.

This module imports triton at top level and is imported lazily. Whether the
kernels run compiled or in the interpreter is decided by triton when they are
defined here (``TRITON_INTERPRET=1`` must be set before this import).
"""

from __future__ import annotations

import triton
import triton.language as tl

from loka.kernels.triton_fp8_jit import (
    finite_abs,
    fp8_round_emulated,
    fp8_scale_and_clamp,
    fp8_scale_from_amax,
    round_to_bf16_emulated,
)

# How the kernel gets a's dequant scale (constexpr A_SCALE_MODE).
A_ROWWISE_DYNAMIC = 0  # per-row amax computed in the kernel (the fused path)
A_ROWWISE_GIVEN = 1  # scale[M] given (delayed / static scaling)
A_TENSOR_AMAX = 2  # tensor amax given by the pre-pass below; scale computed here
A_TENSOR_GIVEN = 3  # scalar scale given

GROUP_M = 8
# (BLOCK_M, BLOCK_N, BLOCK_K, N_TILES, num_warps, num_stages): a small list for
# small and skinny shapes (K, N 64..2048). BLOCK_K=256 lets K <= 256 run in one
# pass; N_TILES > 1 (one-pass only) reuses a program's quantized a across N tiles.
# Register use checked by compiling for sm_90 (ptxas -v): 4 warps spill with a
# 128-row hp tile in flight, so those tiles get 8 warps.
_TILES = [
    (128, 128, 128, 1, 8, 3),
    (128, 64, 128, 1, 8, 3),
    (64, 128, 128, 1, 4, 3),
    (64, 64, 128, 1, 4, 4),
    (128, 128, 64, 1, 8, 4),
    (128, 256, 64, 1, 8, 3),
    (64, 64, 256, 1, 4, 3),
    (128, 64, 256, 1, 8, 2),
    (64, 128, 128, 4, 4, 3),
    (128, 128, 128, 4, 8, 3),
    (64, 128, 256, 4, 8, 3),
    (128, 128, 256, 2, 8, 2),
    (64, 256, 128, 4, 8, 3),
    (64, 128, 64, 4, 4, 3),
]
# Few programs: the interpreter pays per program, not per element.
INTERPRETER_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, N_TILES=1)


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "N_TILES": nt}, num_warps=w, num_stages=s)
        for bm, bn, bk, nt, w, s in _TILES
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem and N_TILES that cannot pay off; keep at least one."""
    n, k = named_args["N"], kwargs.get("K", named_args.get("K"))
    fast = kwargs.get("FAST_ACCUM", named_args.get("FAST_ACCUM", True))
    n_cap, k_cap = max(64, triton.next_power_of_2(n)), max(64, triton.next_power_of_2(k))

    def useful(c):
        bm, bn, bk, nt = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["N_TILES"]
        one_pass = k <= bk
        # BLOCK_K > 128 is for one-pass only (in a pipelined K loop triton 3.9 rejects it for sm_90).
        # A precise K loop holds two accumulators (running sum + partial): 128x256 spills
        # (ptxas -v for sm_90, triton 3.6: 255 registers, 388 bytes of spill stores).
        fits = fast or one_pass or bm * bn <= 128 * 128
        return (bn <= n_cap and bk <= k_cap and (one_pass or bk <= 128) and fits
                and (nt == 1 or (one_pass and bn * nt <= n_cap)))

    kept = [c for c in configs if useful(c)]
    return kept or configs[:1]


@triton.jit
def _load_a(a_ptr, rm, k0, M, K: tl.constexpr, stride_am, stride_ak, BLOCK_K: tl.constexpr):
    """a[rm, k0:k0+BLOCK_K] in a's dtype, 0 outside the matrix. [BLOCK_M, BLOCK_K]"""
    rk = k0 + tl.arange(0, BLOCK_K)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    return tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask, other=0.0)


@triton.jit
def _a_scale(a_ptr, a_scale_ptr, rm, M, K: tl.constexpr, stride_am, stride_ak,
             A_SCALE_MODE: tl.constexpr, RCP_FMAX: tl.constexpr, POW2: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequant scale of each row of this program's block of a. [BLOCK_M] float32"""
    if A_SCALE_MODE == 0:
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _load_a(a_ptr, rm, k0, M, K, stride_am, stride_ak, BLOCK_K).to(tl.float32)
            amax = tl.maximum(amax, tl.max(finite_abs(a), axis=1))
        scale = fp8_scale_from_amax(amax, RCP_FMAX, POW2)
    elif A_SCALE_MODE == 1:
        scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=1.0)
    elif A_SCALE_MODE == 2:
        scale = fp8_scale_from_amax(tl.zeros([BLOCK_M], tl.float32) + tl.load(a_scale_ptr), RCP_FMAX, POW2)
    else:
        scale = tl.zeros([BLOCK_M], tl.float32) + tl.load(a_scale_ptr)
    return scale


@triton.jit
def _quantize_a(a, a_scale, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, POW2: tl.constexpr,
                FP8_DTYPE: tl.constexpr, EMULATE: tl.constexpr, A_IS_FP8: tl.constexpr):
    """FP8 tile of a / a_scale (native), or its FP8 values held in float32 (emulated). [BM, BK]"""
    if A_IS_FP8:
        a_q = a  # already quantized; its scale is applied in the epilogue
    else:
        y = fp8_scale_and_clamp(a.to(tl.float32), a_scale[:, None], FMAX, POW2)
        if EMULATE:
            a_q = fp8_round_emulated(y, MBITS, EMIN)
        else:
            a_q = y.to(FP8_DTYPE)
    return a_q


@triton.jit
def _dot(a_q, b, acc, FAST_ACCUM: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a_q · b; acc None starts a fresh sum.  a_q [BM, BK], b [BK, BN] FP8, acc [BM, BN] float32.

    Precise mode is two-level accumulation (as cuBLAS without fast accumulation
    and DeepGEMM do): Hopper's FP8 MMAs keep about 14 mantissa bits while they
    accumulate, so each BLOCK_K chunk (<= 128 products in the K loop) is summed
    by the tensor cores into a fresh partial that is then added to the running
    float32 sum on the CUDA cores. Passing the running sum as the dot's
    accumulator with ``max_num_imprecise_acc`` does not survive triton 3.6-3.9:
    the pipeliner splits a dot whose A comes from registers into K=32/64 pieces
    marked ``maxNumImpreciseAcc = 2**30`` and chains them on one accumulator
    (seen in the sm_90 TTGIR; test_triton_compile.py checks the float32 adds).
    ``max_num_imprecise_acc=0`` would make triton fall back to float16 MMAs.
    """
    if EMULATE:
        # FP8 values held in float32: products of two FP8 values are exact in
        # float32, so this is the FP8 GEMM with float32 accumulation.
        part = tl.dot(a_q.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        out = part if acc is None else acc + part
    elif FAST_ACCUM:
        zero = tl.zeros([a_q.shape[0], b.shape[1]], tl.float32)
        out = tl.dot(a_q, b, zero if acc is None else acc)
    else:
        PROMOTE_K: tl.constexpr = 128 if a_q.shape[1] > 128 else a_q.shape[1]
        zero = tl.zeros([a_q.shape[0], b.shape[1]], tl.float32)
        part = tl.dot(a_q, b, zero, max_num_imprecise_acc=PROMOTE_K)
        out = part if acc is None else acc + part
    return out


@triton.jit
def _store_tile(out_ptr, acc, a_scale, b_scale_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_on,
                B_ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr):
    """Epilogue: dequantize once per output (acc * s_a[m] * s_b[n]), add bias, store."""
    out = acc * a_scale[:, None]
    if B_ROWWISE:
        out = out * tl.load(b_scale_ptr + rn, mask=rn < N, other=1.0)[None, :]
    else:
        out = out * tl.load(b_scale_ptr)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EMULATE:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            out = round_to_bf16_emulated(out)  # the interpreter's bf16 cast truncates
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_b(b_ptr, rn, k0, N, K: tl.constexpr, stride_bn, stride_bk, BLOCK_K: tl.constexpr):
    """b[rn, k0:k0+BLOCK_K] transposed to [BLOCK_K, BLOCK_N] (still K-contiguous in memory)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    mask = (rk[:, None] < K) & (rn[None, :] < N)
    return tl.load(b_ptr + rn[None, :] * stride_bn + rk[:, None] * stride_bk, mask=mask, other=0.0)


@triton.jit
def fp8_gemm_fused_quant_kernel(
    a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K: tl.constexpr, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    A_SCALE_MODE: tl.constexpr, B_ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    POW2: tl.constexpr, FAST_ACCUM: tl.constexpr, EMULATE: tl.constexpr, A_IS_FP8: tl.constexpr,
    FMAX: tl.constexpr, RCP_FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, FP8_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_TILES: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """N_TILES tiles [BLOCK_M, BLOCK_N] of out along N; programs walk M in groups of GROUP_M (L2 reuse of a)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N * N_TILES)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_first = pid_n * BLOCK_N * N_TILES

    if K <= BLOCK_K:
        # K fits one tile: read and quantize a once, keep it in registers for every N tile.
        a = _load_a(a_ptr, rm, 0, M, K, stride_am, stride_ak, BLOCK_K)
        if A_SCALE_MODE == 0:
            a_scale = fp8_scale_from_amax(tl.max(finite_abs(a.to(tl.float32)), axis=1), RCP_FMAX, POW2)
        else:
            a_scale = _a_scale(a_ptr, a_scale_ptr, rm, M, K, stride_am, stride_ak,
                               A_SCALE_MODE, RCP_FMAX, POW2, BLOCK_M, BLOCK_K)
        a_q = _quantize_a(a, a_scale, FMAX, MBITS, EMIN, POW2, FP8_DTYPE, EMULATE, A_IS_FP8)
        for t in range(N_TILES):
            n0 = n_first + t * BLOCK_N
            if n0 < N:
                rn = n0 + tl.arange(0, BLOCK_N)
                b = _load_b(b_ptr, rn, 0, N, K, stride_bn, stride_bk, BLOCK_K)
                acc = _dot(a_q, b, None, FAST_ACCUM, EMULATE)
                _store_tile(out_ptr, acc, a_scale, b_scale_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_on,
                            B_ROWWISE, HAS_BIAS, EMULATE)
    else:
        a_scale = _a_scale(a_ptr, a_scale_ptr, rm, M, K, stride_am, stride_ak,
                           A_SCALE_MODE, RCP_FMAX, POW2, BLOCK_M, BLOCK_K)
        for t in range(N_TILES):
            n0 = n_first + t * BLOCK_N
            if n0 < N:
                rn = n0 + tl.arange(0, BLOCK_N)
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    a = _load_a(a_ptr, rm, k0, M, K, stride_am, stride_ak, BLOCK_K)
                    b = _load_b(b_ptr, rn, k0, N, K, stride_bn, stride_bk, BLOCK_K)
                    a_q = _quantize_a(a, a_scale, FMAX, MBITS, EMIN, POW2, FP8_DTYPE, EMULATE, A_IS_FP8)
                    acc = _dot(a_q, b, acc, FAST_ACCUM, EMULATE)
                _store_tile(out_ptr, acc, a_scale, b_scale_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_on,
                            B_ROWWISE, HAS_BIAS, EMULATE)


fp8_gemm_fused_quant_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "A_SCALE_MODE", "B_ROWWISE", "EMULATE", "FAST_ACCUM", "A_IS_FP8"],
    prune_configs_by={"early_config_prune": _prune},
)(fp8_gemm_fused_quant_kernel)


@triton.jit
def finite_amax_kernel(x_ptr, amax_ptr, M, K: tl.constexpr, stride_m, stride_k, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Tensorwise pre-pass: atomically max |x| over finite values into amax_ptr[0] (zeroed). K is a
    constexpr, as in the GEMM kernels: Triton 3.6's interpreter cannot loop to a runtime int with NumPy 2.4."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    amax = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_m + rk[None, :] * stride_k, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(finite_abs(x.to(tl.float32)), axis=1))
    tl.atomic_max(amax_ptr, tl.max(amax, axis=0))
