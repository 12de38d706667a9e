"""The Triton fused-quantization FP8 GEMM against its PyTorch reference and ``emulated``.

Interpreter tests (CPU, TRITON_INTERPRET=1, run in a subprocess by
``test_under_interpreter``) check the kernel logic: tiling and masks, the fused
rowwise amax over one or several K tiles, scales (zero rows, pow2, given
scales, the 2**-126 floor), saturation, NaN/Inf, the epilogue and bias. Under
the interpreter the FP8 cast is emulated in float32 (triton 3.9's interpreter
casts float32 -> float8 wrongly) and the dot runs in float32 on FP8 values;
the native cast and FP8 tensor-core dot are checked by the requires_sm89 tests.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from loka.formats import get_format
from loka.quantize import dequantize, quantize
from loka.recipe import GemmRecipe, OperandRecipe

from loka.kernels.kernel import Quantized
from loka.kernels.backend_reference import EmulatedKernel
from loka.kernels.triton_gemm import (
    fp8_mm,
    fp8_mm_fused_quant,
    fp8_mm_fused_quant_reference,
    fp8_mm_reference,
    triton_available,
)
from triton_interp_driver import INTERPRETING, SKIP_REASON, run_file_under_interpreter

interp = pytest.mark.skipif(not INTERPRETING, reason=SKIP_REASON)
SHAPES = [(m, k, n) for m in (1, 7, 64) for k, n in ((16, 16), (48, 64), (64, 48))]
# (a granularity, b granularity, a dtype, out dtype, with bias, tile: None = the interpreter's
# default 64x64x64, one K tile at these sizes; small tiles loop over K and split M and N;
# a 4th entry N_TILES > 1 makes each program walk several N tiles, some past N)
VARIANTS = [
    ("rowwise", "rowwise", torch.bfloat16, torch.bfloat16, True, (32, 32, 16)),
    ("tensorwise", "tensorwise", torch.float32, torch.float32, False, None),
    ("rowwise", "tensorwise", torch.float32, torch.bfloat16, True, (16, 16, 64, 3)),
    ("rowwise", "rowwise", torch.float32, torch.float32, False, (32, 16, 32, 2)),
]


def _gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def make_a(m: int, k: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random rows of very different magnitudes plus edge rows: zeros, large, subnormal-range, an outlier."""
    a = torch.randn(m, k, generator=gen) * 10.0 ** (torch.rand(m, 1, generator=gen) * 4 - 2)
    edge_rows = [
        torch.zeros(k),
        torch.randn(k, generator=gen) * 3e4,  # large (bf16 and the float32 quotient stay finite)
        torch.randn(k, generator=gen) * 1e-39,  # amax/448 below 2**-126: scale floored, FP8 subnormals
        torch.cat([torch.full((1,), 2e3), torch.randn(k - 1, generator=gen) * 1e-3]),  # outlier: others underflow
    ]
    for i, row in enumerate(edge_rows[: max(0, m - 1)]):
        a[i + 1 if m > 1 else 0] = row
    return a.to(dtype)


def make_b(n: int, k: int, granularity: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=gen) * 10.0 ** (torch.rand(n, 1, generator=gen) * 2 - 1)
    return quantize(w, "e4m3", granularity)


def tolerance(a, b_fp8, b_scale, granularity, bias, out_dtype, tensor_cores: str | None = None) -> torch.Tensor:
    """Bound on |kernel - reference| from float32 accumulation order and the output rounding.

    Both sum the same exact products in float32 in different orders (<= 2K u |terms|
    each way), apply scales (a few u) and round to out_dtype (<= 1 ulp apart).
    ``tensor_cores``: Hopper's FP8 MMAs keep about 14 mantissa bits while they
    accumulate; "precise" (promoted to float32 every 128 products) adds 2**-12
    of the magnitude, "fast" (never promoted) K * 2**-19 of it.
    """
    k = b_fp8.shape[1]
    a_q, s_a = quantize(a, "e4m3", granularity)
    mag = (a_q.float().abs().nan_to_num(0) @ b_fp8.float().abs().t()) * s_a.reshape(-1, 1) * b_scale.reshape(1, -1)
    if bias is not None:
        mag = mag + bias.float().abs()
    u = 2.0**-24
    out_ulp = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[out_dtype]
    hopper = {None: 0.0, "precise": 2.0**-12, "fast": max(2.0**-12, k * 2.0**-19)}[tensor_cores]
    return (2 * k + 8) * u * mag + out_ulp * mag + hopper * mag + 1e-45


@pytest.mark.skipif(INTERPRETING, reason="this is the driver of the interpreter tests")
def test_under_interpreter():
    run_file_under_interpreter(__file__, min_passed=78)  # every interpreter test of this file plus the two plain ones


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}".format(*s))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}-{str(v[2])[6:]}-{str(v[3])[6:]}-{v[5]}")
def test_matches_reference(shape, variant):
    m, k, n = shape
    gran_a, gran_b, a_dtype, out_dtype, with_bias, tile = variant
    gen, seed = _gen()
    a = make_a(m, k, gen, a_dtype)
    b_fp8, b_scale = make_b(n, k, gran_b, gen)
    bias = torch.randn(n, generator=gen).to(a_dtype) if with_bias else None
    kw = dict(granularity=gran_a, bias=bias, out_dtype=out_dtype)
    out = fp8_mm_fused_quant(a, b_fp8, b_scale, tile=tile, **kw)
    ref = fp8_mm_fused_quant_reference(a, b_fp8, b_scale, **kw)
    assert out.shape == (m, n) and out.dtype == out_dtype
    err = (out.float() - ref.float()).abs()
    tol = tolerance(a, b_fp8, b_scale, gran_a, bias, out_dtype)
    assert bool((err <= tol).all()), f"seed={seed}: max excess {(err - tol).max().item():.3g}"
    if out_dtype != torch.float32:  # the epilogue rounds the float32 result to nearest even
        out_fp32 = fp8_mm_fused_quant(a, b_fp8, b_scale, tile=tile, **{**kw, "out_dtype": torch.float32})
        assert torch.equal(out, out_fp32.to(out_dtype)), f"seed={seed}"


@interp
@pytest.mark.parametrize("k", [16, 48, 64])
@pytest.mark.parametrize("tile", [(16, 16, 64, 2), (16, 32, 16)], ids=["one-K-tile", "K-loop"])
@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e4m3", True), ("e5m2", False)])
def test_fused_quantization_is_bit_exact(k, tile, fmt, pow2):
    """With b = I (one exact product per output) the fp32 output IS the dequantized a."""
    gen, seed = _gen()
    a = make_a(13, k, gen)
    eye = torch.eye(k).to(torch.float8_e4m3fn)
    out = fp8_mm_fused_quant(a, eye, torch.ones(()), a_format=fmt, pow2_scale=pow2, out_dtype=torch.float32, tile=tile)
    a_q, s_a = quantize(a, fmt, "rowwise", pow2_scale=pow2)
    assert torch.equal(out, dequantize(a_q, s_a)), f"seed={seed}"


def tie_rows(m: int, gen: torch.Generator) -> torch.Tensor:
    """Rows [amax, values within one float32 ulp of FP8 rounding ties]: there ``x / scale`` and
    ``x * (1 / scale)`` round to different FP8 values, so only IEEE division matches quantize."""
    amax = torch.rand(m, generator=gen) * 100 + 1
    scale = (amax.double() * float(torch.tensor(1 / 448, dtype=torch.float32))).float()  # the scale rule, in float64
    ties = 1 + (2 * torch.arange(8) + 1) / 16  # midpoints between e4m3 values in [1, 2)
    x0 = ties[None, :] * scale[:, None]
    up, down = torch.nextafter(x0, torch.full_like(x0, 1e9)), torch.nextafter(x0, torch.zeros_like(x0))
    return torch.cat([amax[:, None], torch.stack([x0, up, down], -1).reshape(m, -1)], 1)  # [m, 25]


@interp
@pytest.mark.parametrize("tile", [(16, 16, 32), (16, 16, 16)], ids=["one-K-tile", "K-loop"])
def test_quantization_divides_exactly_at_rounding_ties(tile):
    gen, seed = _gen()
    a = tie_rows(40, gen)
    a_q, s_a = quantize(a, "e4m3", "rowwise")
    sloppy = (a * (1 / s_a)).to(torch.float8_e4m3fn)
    assert not torch.equal(sloppy.float(), a_q.float()), "the rows must tell IEEE division from a reciprocal"
    eye = torch.eye(a.shape[1]).to(torch.float8_e4m3fn)
    out = fp8_mm_fused_quant(a, eye, torch.ones(()), out_dtype=torch.float32, tile=tile)
    assert torch.equal(out, dequantize(a_q, s_a)), f"seed={seed}"


def oracle_dequantized(x: np.ndarray, amax: np.ndarray, fmt: str, pow2: bool) -> np.ndarray:
    """``q(x / s) * s`` in float32 with ``s`` the scale rule for ``amax``, computed in float64 and
    rounded once, and the FP8 rounding done by ml_dtypes (nothing from loka)."""
    fmax = get_format(fmt).max
    rcp = np.float64(np.float32(1.0 / np.float64(fmax)))
    a64 = amax.astype(np.float64)
    s = np.maximum(np.where(a64 > 0, a64 * rcp, 1.0).astype(np.float32), np.float32(2.0**-126))
    if pow2:
        s = np.exp2(np.ceil(np.log2(s.astype(np.float64)))).astype(np.float32)
    y = np.clip(x / s, -fmax, fmax)  # float32 IEEE division, saturated
    q = y.astype({"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]).astype(np.float64)
    return (q * s.astype(np.float64)).astype(np.float32)  # the epilogue's float32 product


@interp
@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e4m3", True), ("e5m2", False), ("e5m2", True)])
@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_kernel_scale_equals_an_independent_oracle(fmt, pow2, granularity):
    """Rows holding one value times b = I: each output is ``q(x / s) * s``, which pins the kernel's
    scale ``s`` to the rule. Rowwise: x from every float32 binade (subnormals, 0, powers of two)."""
    gen, seed = _gen()
    if granularity == "rowwise":
        x = torch.randint(0, 0x7F000000, (96,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
        x[:4] = torch.tensor([0.0, 2.0**-149, 448 * 2.0**-126, 448 * 2.0**20])
    else:  # one scale: values within FP8's reach of the largest, at a random binade
        exp = float(torch.randint(-140, 100, (), generator=gen))
        x = torch.exp2(torch.empty(96).uniform_(-20, 0, generator=gen) + exp)
    a = torch.zeros(x.numel(), 16)
    a[:, 0] = x
    eye = torch.eye(16).to(torch.float8_e4m3fn)
    out = fp8_mm_fused_quant(a, eye, torch.ones(()), a_format=fmt, granularity=granularity, pow2_scale=pow2,
                             out_dtype=torch.float32)[:, 0].numpy()
    x_np = x.numpy()
    ref = oracle_dequantized(x_np, x_np if granularity == "rowwise" else np.full_like(x_np, x_np.max()), fmt, pow2)
    bad = np.flatnonzero(out != ref)
    assert bad.size == 0, f"seed={seed}: x {x_np[bad[:4]]} -> {out[bad[:4]]}, expected {ref[bad[:4]]}"


@interp
@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_given_scale_saturates_like_quantize(granularity):
    """A static scale too small for the data: values clamp to ±448, as loka.quantize does."""
    gen, seed = _gen()
    a = make_a(9, 48, gen)
    scale = torch.full((9, 1), 1e-3) if granularity == "rowwise" else torch.tensor(1e-3)
    eye = torch.eye(48).to(torch.float8_e4m3fn)
    out = fp8_mm_fused_quant(a, eye, torch.ones(()), granularity=granularity, a_scale=scale, out_dtype=torch.float32)
    a_q, s_a = quantize(a, "e4m3", granularity, scale=scale)
    assert torch.equal(out, dequantize(a_q, s_a)), f"seed={seed}"
    assert (out.abs() == 448 * 1e-3).any()


@interp
def test_nonfinite_rows_are_nan_and_do_not_touch_other_rows():
    gen, seed = _gen()
    a = make_a(7, 48, gen)
    a[1, 5], a[3, 0] = float("nan"), float("inf")
    b_fp8, b_scale = make_b(16, 48, "rowwise", gen)
    out = fp8_mm_fused_quant(a, b_fp8, b_scale, out_dtype=torch.float32)
    ref = fp8_mm_fused_quant_reference(a, b_fp8, b_scale, out_dtype=torch.float32)
    assert out[[1, 3]].isnan().all() and ref[[1, 3]].isnan().all()
    keep = [0, 2, 4, 5, 6]
    tol = tolerance(a[keep], b_fp8, b_scale, "rowwise", None, torch.float32)
    assert bool(((out[keep] - ref[keep]).abs() <= tol).all()), f"seed={seed}"


@interp
def test_strided_and_batched_a():
    """a as a transposed view (the wgrad layout) and with leading batch dims."""
    gen, seed = _gen()
    b_fp8, b_scale = make_b(16, 48, "rowwise", gen)
    a_t = make_a(48, 21, gen).t()  # [21, 48], column-major
    out = fp8_mm_fused_quant(a_t, b_fp8, b_scale)
    ref = fp8_mm_fused_quant_reference(a_t.contiguous(), b_fp8, b_scale)
    assert bool(((out - ref).abs() <= tolerance(a_t, b_fp8, b_scale, "rowwise", None, torch.float32)).all()), seed
    a3 = make_a(12, 48, gen).reshape(3, 4, 48)
    out3 = fp8_mm_fused_quant(a3, b_fp8, b_scale)
    assert out3.shape == (3, 4, 16)
    assert torch.allclose(out3.reshape(12, 16), fp8_mm_fused_quant(a3.reshape(12, 48), b_fp8, b_scale))


@interp
@pytest.mark.parametrize("gran_a,gran_b", [("rowwise", "rowwise"), ("tensorwise", "rowwise")])
def test_backend_matches_emulated(gran_a, gran_b):
    """The registry adapter against the ``emulated`` kernel (hp b and pre-quantized b)."""
    from loka.kernels.triton_backend import TritonFusedQuantKernel

    gen, seed = _gen()
    recipe = GemmRecipe(OperandRecipe("e4m3", gran_a), OperandRecipe("e4m3", gran_b))
    a, w = make_a(33, 64, gen), torch.randn(24, 64, generator=gen)
    kernel = TritonFusedQuantKernel()
    assert kernel.available("cpu")
    ref = EmulatedKernel().mm(a, w, recipe, out_dtype=torch.float32)
    for b in (w, Quantized(*quantize(w, "e4m3", gran_b))):
        out = kernel.mm(a, b, recipe, out_dtype=torch.float32)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-6, f"seed={seed}: relative error {rel:.3g} vs emulated"


@interp
@pytest.mark.parametrize("a_gran,tile", [("rowwise", None), ("tensorwise", (32, 16, 16))])
def test_prequantized_a(a_gran, tile):
    """fp8_mm: a quantized beforehand (e.g. by the fused norm), scales in the epilogue."""
    gen, seed = _gen()
    a_q, s_a = quantize(make_a(37, 48, gen), "e4m3", a_gran)
    eye = torch.eye(48).to(torch.float8_e4m3fn)
    out = fp8_mm(a_q, s_a, eye, torch.ones(()), out_dtype=torch.float32, tile=tile)
    assert torch.equal(out, dequantize(a_q, s_a)), f"seed={seed}"
    b_fp8, b_scale = make_b(20, 48, "rowwise", gen)
    bias = torch.randn(20, generator=gen)
    out = fp8_mm(a_q, s_a, b_fp8, b_scale, bias=bias, out_dtype=torch.float32, tile=tile)
    ref = fp8_mm_reference(a_q, s_a, b_fp8, b_scale, bias=bias, out_dtype=torch.float32)
    mag = (a_q.float().abs() @ b_fp8.float().abs().t()) * s_a.reshape(-1, 1) * b_scale.reshape(1, -1) + bias.abs()
    assert bool(((out - ref).abs() <= (2 * 48 + 8) * 2.0**-24 * mag).all()), f"seed={seed}"


@interp
@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("k", [72, 128])
def test_accumulation_modes_over_several_k_tiles(fast_accum, k):
    """The native dot's two accumulation paths (precise: a fresh partial per K tile added to the
    running sum) give the reference's sum when K spans several BLOCK_K, the last one partial.
    ``fp8_mm`` with ``emulate=False``: a is FP8 already, so no cast runs in the interpreter."""
    gen, seed = _gen()
    a_q, s_a = quantize(make_a(19, k, gen), "e4m3", "rowwise")
    b_fp8, b_scale = make_b(24, k, "rowwise", gen)
    out = fp8_mm(a_q, s_a, b_fp8, b_scale, out_dtype=torch.float32, tile=(16, 16, 16), emulate=False,
                 fast_accum=fast_accum)
    ref = fp8_mm_reference(a_q, s_a, b_fp8, b_scale, out_dtype=torch.float32)
    mag = (a_q.float().abs() @ b_fp8.float().abs().t()) * s_a.reshape(-1, 1) * b_scale.reshape(1, -1)
    assert bool(((out - ref).abs() <= (2 * k + 8) * 2.0**-24 * mag).all()), f"seed={seed}"
    a = make_a(19, k, gen)  # the fused path, emulated cast, K loop of 16-wide tiles
    out = fp8_mm_fused_quant(a, b_fp8, b_scale, out_dtype=torch.float32, tile=(16, 16, 16), fast_accum=fast_accum)
    ref = fp8_mm_fused_quant_reference(a, b_fp8, b_scale, out_dtype=torch.float32)
    assert bool(((out - ref).abs() <= tolerance(a, b_fp8, b_scale, "rowwise", None, torch.float32)).all()), seed


def test_reference_agrees_with_emulated():
    """The reference (scales in the epilogue) is the emulated GEMM (scales on the operands)."""
    gen, seed = _gen()
    for gran in ("rowwise", "tensorwise"):
        a, w = make_a(37, 48, gen), torch.randn(20, 48, generator=gen)
        b_fp8, b_scale = quantize(w, "e4m3", gran)
        recipe = GemmRecipe(OperandRecipe("e4m3", gran), OperandRecipe("e4m3", gran))
        ref = fp8_mm_fused_quant_reference(a, b_fp8, b_scale, granularity=gran, out_dtype=torch.float32)
        emu = EmulatedKernel().mm(a, Quantized(b_fp8, b_scale), recipe, out_dtype=torch.float32)
        tol = tolerance(a, b_fp8, b_scale, gran, None, torch.float32)
        assert bool(((ref - emu).abs() <= tol).all()), f"seed={seed} {gran}"


@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("n,k", [(64, 64), (256, 256), (1024, 256), (512, 1024), (2048, 2048), (48, 200)])
def test_autotune_pruning_keeps_valid_tiles(n, k, fast_accum):
    """The GPU autotuner's pruning (plain Python, checked here without a GPU)."""
    from loka.kernels import triton_gemm_kernel as mod

    configs = mod._configs()
    kept = mod._prune(configs, {"N": n, "K": k, "M": 8192}, FAST_ACCUM=fast_accum)
    assert kept
    for c in kept:
        bm, bn, bk, nt = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["N_TILES"]
        assert bk <= 128 or k <= bk, "BLOCK_K > 128 only where K fits one tile"
        assert nt == 1 or k <= bk, "several N tiles per program only where a is quantized once"
        assert fast_accum or k <= bk or bm * bn <= 128 * 128, "a precise K loop's two accumulators must fit"
    if k <= 256 and n >= 256:
        assert any(c.kwargs["N_TILES"] > 1 for c in kept)


def test_bad_inputs_are_refused_with_a_reason():
    b_fp8, b_scale = quantize(torch.randn(8, 16), "e4m3", "rowwise")
    a = torch.randn(4, 16)
    with pytest.raises(ValueError, match="a_format"):
        fp8_mm_fused_quant(a, b_fp8, b_scale, a_format="e3m4")
    with pytest.raises(ValueError, match="reduction dim"):
        fp8_mm_fused_quant(torch.randn(4, 15), b_fp8, b_scale)
    with pytest.raises(TypeError, match="b_fp8"):
        fp8_mm_fused_quant(a, b_fp8.float(), b_scale)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_mm_fused_quant(a, b_fp8, torch.ones(3))
    with pytest.raises(ValueError, match="a_scale"):
        fp8_mm_fused_quant(a, b_fp8, b_scale, a_scale=torch.ones(3, 1))
    with pytest.raises(TypeError, match="fp8_mm_fused_quant"):
        fp8_mm(a, torch.ones(4, 1), b_fp8, b_scale)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_mm(*quantize(a, "e4m3", "rowwise")[:1], torch.ones(5, 1), b_fp8, b_scale)


@pytest.mark.skipif(INTERPRETING, reason="checks the compiled (non-interpreted) mode")
def test_cpu_without_interpreter_is_unavailable_with_reason():
    ok, reason = triton_available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fp8_mm_fused_quant(torch.randn(4, 16), *quantize(torch.randn(8, 16), "e4m3", "rowwise"))


# ---- GPU (sm_89+): the native FP8 cast and tensor-core dot, autotuned --------------------------


@pytest.mark.requires_sm89
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (1000, 256, 256), (4099, 512, 1024), (8192, 1024, 256), (333, 2048, 96)])
@pytest.mark.parametrize("gran", ["rowwise", "tensorwise"])
def test_gpu_native_matches_reference_and_emulated_cast(m, k, n, gran):
    gen, seed = _gen()
    a = make_a(m, k, gen, torch.bfloat16).cuda()
    b_fp8, b_scale = (t.cuda() for t in make_b(n, k, "rowwise", gen))
    bias = torch.randn(n, generator=gen).cuda()
    kw = dict(granularity=gran, bias=bias, out_dtype=torch.float32)
    out = fp8_mm_fused_quant(a, b_fp8, b_scale, **kw)
    ref = fp8_mm_fused_quant_reference(a, b_fp8, b_scale, **kw)
    tol = tolerance(a, b_fp8, b_scale, gran, bias, torch.float32, tensor_cores="precise")
    assert bool(((out - ref).abs() <= tol).all()), f"seed={seed}"
    emu = fp8_mm_fused_quant(a, b_fp8, b_scale, emulate=True, tile=(32, 32, 64), **kw)  # fp32 FMA dot: small tile
    assert bool(((out - emu).abs() <= 2 * tol).all()), f"seed={seed}: native vs emulated cast"


@pytest.mark.requires_sm89
@pytest.mark.parametrize("k,tile", [(256, (64, 128, 256, 4)), (200, (128, 128, 256, 2)), (1024, (128, 64, 128, 1)),
                                    (96, (64, 256, 128, 4))])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_gpu_every_tile_shape_matches_reference(k, tile, fast_accum):
    """Explicit tiles: one-pass with several N tiles per program, odd K, the K loop."""
    gen, seed = _gen()
    a = make_a(777, k, gen, torch.bfloat16).cuda()
    b_fp8, b_scale = (t.cuda() for t in make_b(1000, k, "rowwise", gen))
    out = fp8_mm_fused_quant(a, b_fp8, b_scale, out_dtype=torch.float32, tile=tile, fast_accum=fast_accum)
    ref = fp8_mm_fused_quant_reference(a, b_fp8, b_scale, out_dtype=torch.float32)
    tol = tolerance(a, b_fp8, b_scale, "rowwise", None, torch.float32, tensor_cores="fast" if fast_accum else "precise")
    assert bool(((out - ref).abs() <= tol).all()), f"seed={seed}"
    a_q, s_a = quantize(a, "e4m3", "rowwise")
    out8 = fp8_mm(a_q, s_a, b_fp8, b_scale, out_dtype=torch.float32, tile=tile, fast_accum=fast_accum)
    assert bool(((out8 - ref).abs() <= tol).all()), f"seed={seed}: pre-quantized a"


@pytest.mark.requires_sm89
@pytest.mark.parametrize("k", [64, 256, 1024])
def test_gpu_native_cast_is_bit_exact(k):
    gen, seed = _gen()
    a = make_a(257, k, gen).cuda()
    eye = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)
    out = fp8_mm_fused_quant(a, eye, torch.ones((), device="cuda"), out_dtype=torch.float32)
    a_q, s_a = quantize(a, "e4m3", "rowwise")
    assert torch.equal(out, dequantize(a_q, s_a)), f"seed={seed}"


@pytest.mark.requires_sm89
@pytest.mark.parametrize("prequantized", [False, True], ids=["fused", "fp8_mm"])
def test_gpu_precise_accumulation_beats_fast_at_large_k(prequantized):
    """At K=8192 the precise mode (float32 promotion every K tile) is measurably more accurate
    than Hopper's fast accumulation; before the two-level sum both gave the same error."""
    gen, seed = _gen()
    m, k, n = 256, 8192, 256
    a = torch.rand(m, k, generator=gen).to(torch.bfloat16).cuda()  # positive: the running sum only grows
    b_fp8, b_scale = (t.cuda() for t in quantize(torch.rand(n, k, generator=gen), "e4m3", "rowwise"))
    a_q, s_a = quantize(a, "e4m3", "rowwise")
    exact = (a_q.double() @ b_fp8.double().t()) * s_a.double() * b_scale.double().reshape(1, -1)  # fp64 reference
    errors = {}
    for fast in (False, True):
        if prequantized:
            out = fp8_mm(a_q, s_a, b_fp8, b_scale, out_dtype=torch.float32, fast_accum=fast)
        else:
            out = fp8_mm_fused_quant(a, b_fp8, b_scale, out_dtype=torch.float32, fast_accum=fast)
        errors[fast] = ((out.double() - exact).abs() / exact.abs()).mean().item()
    print(f"seed={seed} mean relative error: precise {errors[False]:.3g}, fast {errors[True]:.3g}")
    assert errors[False] < 0.5 * errors[True], f"seed={seed}: {errors}"
    assert errors[False] < 2.0**-12, f"seed={seed}: precise error {errors[False]:.3g}"  # tolerance()'s "precise" term
