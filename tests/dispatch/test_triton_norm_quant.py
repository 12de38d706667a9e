"""The fused norm + FP8 quantize Triton kernel against its PyTorch reference.

Under the interpreter (subprocess, TRITON_INTERPRET=1) the kernel builds the FP8
bytes in integer arithmetic; the native cast is checked by the requires_sm89
tests. Two checks per case: the kernel's own float32 ``y`` is close to the
reference norm, and its FP8 bytes and scales are *exactly* what
``loka.quantize.quantize`` makes of that ``y``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loka.formats import get_format
from loka.quantize import quantize

from loka.kernels.triton_norm_quant import fused_norm_quant, norm_quant_reference
from triton_interp_driver import INTERPRETING, SKIP_REASON, run_file_under_interpreter

interp = pytest.mark.skipif(not INTERPRETING, reason=SKIP_REASON)
CASES = [(m, n) for m in (1, 7, 64) for n in (16, 48, 64)] + [(3, 1000)]


def _gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def make_x(m: int, n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Rows with an offset and very different scales, plus a constant row (normalizes to 0) and a large one."""
    x = (torch.randn(m, n, generator=gen) + torch.randn(m, 1, generator=gen) * 3) * 10.0 ** (
        torch.rand(m, 1, generator=gen) * 6 - 3
    )
    if m > 2:
        x[1] = 2.5  # LayerNorm output is exactly 0 (then bias), RMSNorm's is constant
        x[2] = torch.randn(n, generator=gen) * 1e15
    return x.to(dtype)


def affine(n: int, kind: str, gen: torch.Generator):
    w = torch.randn(n, generator=gen)
    w[0] = 0.0  # a zeroed channel
    b = torch.randn(n, generator=gen) if kind == "layernorm" else None
    return w, b


def assert_bytes_are_quantize_of(y_fp8, scale, y_hp, fmt, pow2, seed):
    q, s = quantize(y_hp, fmt, "rowwise", pow2_scale=pow2)
    nan = q.float().isnan()
    assert torch.equal(y_fp8.float().isnan(), nan), f"seed={seed}: NaN positions"
    got, want = y_fp8.view(torch.uint8)[~nan], q.view(torch.uint8)[~nan]
    if INTERPRETING:  # Triton 3.6's interpreter casts -0.0 to +0 (0x80 -> 0x00); the GPU's cast keeps the sign
        got, want = (torch.where(b == 0x80, torch.zeros_like(b), b) for b in (got, want))
    assert torch.equal(got, want), f"seed={seed}: FP8 bytes"
    assert torch.equal(scale, s), f"seed={seed}: scales"


@pytest.mark.skipif(INTERPRETING, reason="this is the driver of the interpreter tests")
def test_under_interpreter():
    run_file_under_interpreter(__file__, min_passed=2 * len(CASES) + 13)  # every interpreter test of this file


@interp
@pytest.mark.parametrize("m,n", CASES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_matches_reference(m, n, kind):
    gen, seed = _gen()
    x = make_x(m, n, gen, torch.bfloat16 if n == 48 else torch.float32)
    w, b = affine(n, kind, gen)
    y_fp8, scale, y_hp = fused_norm_quant(x, w, b, kind=kind, return_hp=True)
    r_fp8, r_scale, r_hp = norm_quant_reference(x, w, b, kind=kind)
    assert y_fp8.dtype == torch.float8_e4m3fn and scale.shape == (m, 1)
    # float32 statistics in a different order: a few ulps of the row's scale.
    row_mag = r_hp.abs().amax(-1, keepdim=True) + 1e-30
    assert bool(((y_hp - r_hp).abs() <= 64 * 2.0**-24 * row_mag * n**0.5).all()), f"seed={seed}"
    assert_bytes_are_quantize_of(y_fp8, scale, y_hp, "e4m3", False, seed)
    # End to end against the reference: scales within float32 noise, values within one FP8 step.
    assert torch.allclose(scale, r_scale, rtol=1e-5, atol=0), f"seed={seed}"
    step = get_format("e4m3").eps * r_scale * 2  # the spacing just below amax, in output units
    assert bool(((y_fp8.float() * scale - r_fp8.float() * r_scale).abs() <= step + 1e-30).all()), f"seed={seed}"


@interp
@pytest.mark.parametrize("fmt,pow2", [("e4m3", True), ("e5m2", False), ("e5m2", True)])
def test_formats_and_pow2_scales(fmt, pow2):
    gen, seed = _gen()
    x = make_x(9, 48, gen)
    w, b = affine(48, "layernorm", gen)
    y_fp8, scale, y_hp = fused_norm_quant(x, w, b, fmt=fmt, pow2_scale=pow2, return_hp=True)
    assert y_fp8.dtype == get_format(fmt).dtype
    assert_bytes_are_quantize_of(y_fp8, scale, y_hp, fmt, pow2, seed)
    if pow2:
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))


@interp
def test_zero_rows_subnormals_and_nonfinite():
    """No weight: a constant row gives y = 0 (scale 1, zero bytes); a tiny weight gives FP8
    subnormals; a NaN/Inf row gives a NaN row and leaves the other rows alone."""
    gen, seed = _gen()
    x = make_x(6, 64, gen)
    x[3, 7], x[4, 0] = float("nan"), float("inf")
    y_fp8, scale, y_hp = fused_norm_quant(x, None, None, return_hp=True)
    assert_bytes_are_quantize_of(y_fp8, scale, y_hp, "e4m3", False, seed)
    assert scale[1].item() == 1.0 and (y_fp8[1].view(torch.uint8) == 0).all()
    assert y_fp8[3].float().isnan().all() and y_fp8[4].float().isnan().all()
    w = torch.full((64,), 3e-5)  # |y| ~ 3e-5 * 448 / amax: inside e4m3's subnormal range
    w[:8] = 1.0  # a few large channels set the scale; the rest land in the FP8 subnormal range
    y_fp8, scale, y_hp = fused_norm_quant(x[:3], w, None, kind="rmsnorm", return_hp=True)
    assert_bytes_are_quantize_of(y_fp8, scale, y_hp, "e4m3", False, seed)
    codes = y_fp8.view(torch.uint8) & 0x7F
    assert ((codes > 0) & (codes < 8)).any(), "expected FP8 subnormals"


@interp
def test_batched_and_strided_input():
    gen, seed = _gen()
    x = make_x(24, 96, gen)[:, ::2].reshape(2, 12, 48)  # non-contiguous, with leading dims
    w, b = affine(48, "layernorm", gen)
    y_fp8, scale, y_hp = fused_norm_quant(x, w, b, return_hp=True)
    assert y_fp8.shape == (2, 12, 48) and scale.shape == (2, 12, 1)
    assert_bytes_are_quantize_of(y_fp8, scale, y_hp, "e4m3", False, seed)


@interp
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_quant_feeds_the_fp8_gemm(kind):
    """Norm -> Linear in serving: fused norm+quant, then the FP8 GEMM on its output, vs the references."""
    from loka.kernels.triton_gemm import fp8_mm, fp8_mm_reference

    gen, seed = _gen()
    x = make_x(21, 64, gen, torch.bfloat16)
    w, b = affine(64, kind, gen)
    weight_fp8, weight_scale = quantize(torch.randn(40, 64, generator=gen) * 0.1, "e4m3", "rowwise")
    y_fp8, scale = fused_norm_quant(x, w, b, kind=kind)
    out = fp8_mm(y_fp8, scale, weight_fp8, weight_scale, out_dtype=torch.float32)
    r_fp8, r_scale, _ = norm_quant_reference(x, w, b, kind=kind)
    ref = fp8_mm_reference(r_fp8, r_scale, weight_fp8, weight_scale, out_dtype=torch.float32)
    assert out.shape == (21, 40)
    # Inputs may differ by one FP8 step where the norms round differently: compare as errors.
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"seed={seed}: relative difference {rel:.3g}"
    same = fp8_mm_reference(y_fp8, scale, weight_fp8, weight_scale, out_dtype=torch.float32)
    assert torch.allclose(out, same, rtol=1e-5, atol=1e-5 * same.abs().max().item()), f"seed={seed}"


def oracle_scale(amax: np.ndarray, fmt: str, pow2: bool) -> np.ndarray:
    """The scale rule ``max(amax * fl32(1/fmax), 2**-126)`` in float64, rounded once (not loka's code)."""
    rcp = np.float64(np.float32(1.0 / np.float64(get_format(fmt).max)))
    amax = amax.astype(np.float32).astype(np.float64)
    scale = np.maximum(np.where(amax > 0, amax * rcp, 1.0).astype(np.float32), np.float32(2.0**-126))
    return np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32) if pow2 else scale


@interp
@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e4m3", True), ("e5m2", False), ("e5m2", True)])
def test_kernel_scales_equal_an_independent_oracle(fmt, pow2):
    """The kernel's scales against the rule computed in numpy from its own ``y``, for rows whose
    amax spans float32: subnormal (weights near 2**-149), ordinary and huge."""
    gen, seed = _gen()
    for lo, hi in ((-149, -112), (-40, 40), (60, 110)):
        w = torch.exp2(torch.empty(48).uniform_(lo, hi, generator=gen)) * torch.randn(48, generator=gen).sign()
        _, scale, y_hp = fused_norm_quant(make_x(16, 48, gen), w, None, kind="rmsnorm", fmt=fmt, pow2_scale=pow2,
                                          return_hp=True)
        ref = oracle_scale(np.abs(y_hp.numpy()).max(axis=1, keepdims=True), fmt, pow2)
        assert np.array_equal(scale.numpy(), ref), f"seed={seed} weights 2**[{lo}, {hi}]"


def test_training_use_is_refused():
    x = torch.randn(4, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        fused_norm_quant(x)


def test_bad_inputs_are_refused_with_a_reason():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="kind"):
        fused_norm_quant(x, kind="batchnorm")
    with pytest.raises(ValueError, match="weight"):
        fused_norm_quant(x, torch.ones(15))
    with pytest.raises(ValueError, match="rmsnorm has no bias"):
        fused_norm_quant(x, None, torch.ones(16), kind="rmsnorm")


# ---- GPU (sm_89+): the native FP8 cast ---------------------------------------------------------


@pytest.mark.requires_sm89
@pytest.mark.parametrize("m,n", [(1, 64), (4099, 256), (8192, 1024), (1000, 4096), (77, 1000)])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_gpu_native_cast_is_quantize_of_y(m, n, kind):
    gen, seed = _gen()
    x = make_x(m, n, gen, torch.bfloat16).cuda()
    w, b = (None if t is None else t.cuda() for t in affine(n, kind, gen))
    y_fp8, scale, y_hp = fused_norm_quant(x, w, b, kind=kind, return_hp=True)
    assert_bytes_are_quantize_of(y_fp8, scale, y_hp, "e4m3", False, seed)
    e_fp8, e_scale = fused_norm_quant(x, w, b, kind=kind, emulate=True)
    assert torch.equal(e_fp8.view(torch.uint8), y_fp8.view(torch.uint8)) and torch.equal(e_scale, scale)
    r_fp8, r_scale, r_hp = norm_quant_reference(x, w, b, kind=kind)
    assert torch.allclose(scale, r_scale, rtol=1e-4, atol=0), f"seed={seed}"
