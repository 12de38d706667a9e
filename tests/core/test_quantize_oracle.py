"""Casts and scales checked element-exact against ml_dtypes (an independent float8 implementation)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from loka.formats import E4M3, E5M2, get_format
from loka.quantize import (
    MIN_SCALE,
    NonFiniteError,
    dequantize,
    expand_scale,
    fake_quantize,
    quantize,
    quantize_operand,
    round_to_format,
    round_up_pow2,
    saturated_cast,
)
from loka.recipe import OperandRecipe

ML_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
BLOCKS = {"tensorwise": (1, 128), "rowwise": (1, 128), "blockwise": (1, 128), "mx": (1, 32)}


def edge_values(fmt: str, n: int = 4096) -> torch.Tensor:
    """Random values spanning subnormals, normals, saturation, zeros and non-finites."""
    f = get_format(fmt)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    log2 = torch.empty(n).uniform_(math.log2(f.min_subnormal) - 3, math.log2(f.max) + 3, generator=g)
    x = torch.exp2(log2) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[:16] = 0.0
    x[16:20] = torch.tensor([math.inf, -math.inf, math.nan, -0.0])
    x[20:24] = torch.tensor([f.max, -f.max, f.min_subnormal, f.min_subnormal / 2])
    return x


def oracle_cast(x: torch.Tensor, fmt: str) -> np.ndarray:
    """Saturate finite values, map Inf as the format can (NaN for e4m3), round with ml_dtypes."""
    f = get_format(fmt)
    v = x.numpy().astype(np.float32)
    finite = np.isfinite(v)
    out = np.where(finite, np.clip(v, -f.max, f.max), v if f.has_inf else np.nan).astype(np.float32)
    return out.astype(ML_DTYPES[fmt]).astype(np.float32)


def oracle_scale(amax: np.ndarray, fmt: str, pow2: bool) -> np.ndarray:
    """The scale rule computed in float64 and rounded once to float32 (independent of loka.quantize).

    ``amax * fl32(1 / fmax)``: the product of two float32 values is exact in float64, so
    rounding it to float32 is the correctly rounded float32 multiply the rule prescribes.
    """
    rcp = np.float64(np.float32(1.0 / np.float64(get_format(fmt).max)))
    amax = np.asarray(amax, dtype=np.float32).astype(np.float64)
    scale = np.where(amax > 0, amax * rcp, 1.0).astype(np.float32)
    scale = np.maximum(scale, np.float32(2.0**-126))
    if pow2:
        scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
    return scale


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturated_cast_matches_ml_dtypes(fmt):
    x = edge_values(fmt)
    ours = saturated_cast(x, fmt).float().numpy()
    ref = oracle_cast(x, fmt)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    both = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[both], ref[both])
    np.testing.assert_array_equal(np.signbit(ours[both]), np.signbit(ref[both]))  # signed zeros too


def ties_and_neighbours(fmt: str) -> torch.Tensor:
    """Every finite value of ``fmt``, every midpoint between neighbours (the ties) and the
    float32 values one ulp either side of each midpoint, both signs."""
    codes = np.arange(256, dtype=np.uint8).view(ML_DTYPES[fmt]).astype(np.float32)
    v = np.unique(np.abs(codes[np.isfinite(codes)]))
    mid = ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)
    pts = np.concatenate([v, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    pts = pts[pts <= get_format(fmt).max]
    return torch.from_numpy(np.concatenate([pts, -pts]))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_round_to_format_matches_ml_dtypes(fmt):
    x = torch.cat([edge_values(fmt), ties_and_neighbours(fmt)])
    f = get_format(fmt)
    saturated = torch.where(torch.isfinite(x), x.clamp(-f.max, f.max), x if f.has_inf else torch.nan)
    ours = round_to_format(saturated, fmt).numpy()
    ref = oracle_cast(x, fmt)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    both = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[both], ref[both])
    np.testing.assert_array_equal(np.signbit(ours[both]), np.signbit(ref[both]))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise", "mx"])
@pytest.mark.parametrize("pow2", [False, True])
def test_fake_quantize_equals_quantize_then_dequantize(fmt, granularity, pow2):
    rows, cols = 37, 200
    x = torch.randn(rows, cols) * torch.exp(torch.randn(rows, 1) * 4)
    x[3] = 0.0
    x[4, :5] = torch.tensor([math.inf, -math.inf, math.nan, -0.0, torch.finfo(torch.float32).tiny / 4])
    x[6] = -x[6].abs()  # a row whose smallest values round to -0
    block = (16, 32) if granularity == "blockwise" else BLOCKS[granularity]
    op = OperandRecipe(format=fmt, granularity=granularity, block=block, pow2_scale=pow2)
    x_fp8, scale = quantize_operand(x, op)
    ref = dequantize(x_fp8, scale, block=None if granularity in ("tensorwise", "rowwise") else block).numpy()
    ours = fake_quantize(x, op).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    both = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[both], ref[both])
    np.testing.assert_array_equal(np.signbit(ours[both]), np.signbit(ref[both]))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_format_limits_match_ml_dtypes(fmt):
    info = ml_dtypes.finfo(ML_DTYPES[fmt.name])
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.mantissa_bits == info.nmant


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise", "mx"])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_matches_oracle(fmt, granularity, pow2):
    rows, cols = 37, 200  # not multiples of any block
    x = torch.randn(rows, cols) * torch.exp(torch.randn(rows, 1) * 3)
    tiny = torch.finfo(torch.float32).tiny
    x[3] = 0.0  # a zero row
    x[5, :7] = tiny / 4  # float32 subnormals
    x[6] = torch.randn(cols) * tiny / 8  # a row whose amax is subnormal
    x[7] = torch.randn(cols) * 1e37  # huge amax (x / scale stays finite)
    x[8] = torch.randn(cols).clamp(-1, 1) * get_format(fmt).max * 2.0**-20
    x[8, ::50] = get_format(fmt).max * 2.0**-20  # amax = fmax * 2**k: a power-of-two quotient
    block = BLOCKS[granularity]
    x_fp8, scale = quantize(x, fmt, granularity, block=block, pow2_scale=pow2)

    # Oracle: amax per group in numpy, scale (float64 rounded once), divide, cast with ml_dtypes.
    ax = np.abs(x.numpy())
    if granularity == "tensorwise":
        amax = np.array(ax.max(), dtype=np.float32)
    elif granularity == "rowwise":
        amax = ax.max(axis=1, keepdims=True)
    else:
        bc = block[1]
        pad = np.pad(ax, ((0, 0), (0, (-cols) % bc)))
        amax = pad.reshape(rows, -1, bc).max(axis=2)
    ref_scale = oracle_scale(amax, fmt, pow2 or granularity == "mx")
    if granularity in ("blockwise", "mx"):
        full = np.repeat(ref_scale, block[1], axis=1)[:, :cols]
    else:
        full = ref_scale
    ref_q = oracle_cast(torch.from_numpy(x.numpy() / full), fmt)

    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(x_fp8.float().numpy(), ref_q)
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_pow2_rounding_is_exact_and_up():
    s = torch.exp2(torch.empty(1000).uniform_(-120, 120))
    s[:3] = torch.tensor([1.0, 0.5, 2.0**-126])
    p = round_up_pow2(s)
    m, _ = torch.frexp(p)
    assert (m == 0.5).all(), "results must be powers of two"
    assert (p >= s).all() and (p < 2 * s).all()
    assert p[0] == 1.0 and p[1] == 0.5


@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise", "mx"])
def test_zero_tensor_gives_no_nan(granularity):
    x = torch.zeros(4, 64)
    q, s = quantize(x, "e4m3", granularity, block=BLOCKS[granularity])
    d = dequantize(q, s, block=BLOCKS[granularity])
    assert torch.equal(d, x) and torch.isfinite(s).all()


def test_nonfinite_policy_skip_and_raise():
    x = torch.randn(8, 64)
    x[2, 5] = math.inf
    x[4, 1] = math.nan
    q, s = quantize(x, "e4m3", "rowwise", nonfinite="skip")
    assert torch.isfinite(s).all()
    d = dequantize(q, s)
    assert torch.isnan(d[2, 5]) and torch.isnan(d[4, 1])  # e4m3 has no Inf
    finite_rows = [0, 1, 3, 5, 6, 7]
    err = (d[finite_rows] - x[finite_rows]).abs() / x[finite_rows].abs().amax(1, keepdim=True)
    assert err.max() <= E4M3.unit_roundoff * 2  # scale unaffected by the Inf in other rows
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        quantize(x, "e4m3", "rowwise", nonfinite="raise")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise", "mx"])
def test_round_trip_error_bounded_by_epsilon(fmt, granularity):
    """Values within the normal range of their group round-trip within the unit roundoff."""
    f = get_format(fmt)
    x = torch.randn(33, 300, dtype=torch.float64).float()
    block = BLOCKS[granularity]
    q, s = quantize(x, fmt, granularity, block=block)
    d = dequantize(q, s, block=block)
    group = None if granularity == "tensorwise" else ((1, 300) if granularity == "rowwise" else block)
    s_full = expand_scale(s, x.shape, group)
    normal = x.abs() >= f.min_normal * s_full
    rel = ((d - x).abs() / x.abs())[normal]
    assert rel.max() <= f.unit_roundoff * (1 + 1e-6)
    # Below the normal range the error is absolute: half a subnormal step.
    assert ((d - x).abs()[~normal] <= f.min_subnormal / 2 * s_full.expand_as(x)[~normal] * (1 + 1e-6)).all()


def test_blockwise_weight_blocks_and_errors():
    w = torch.randn(200, 300)
    q, s = quantize(w, "e4m3", "blockwise", block=(128, 128))
    assert s.shape == (2, 3)
    with pytest.raises(ValueError, match="pass block"):
        dequantize(q, s)
    d = dequantize(q, s, block=(128, 128))
    assert (d - w).abs().max() <= w.abs().max() * E4M3.unit_roundoff * 1.01
    # One column block: the scale is [Rg, 1] yet not rowwise.
    w_narrow = torch.randn(256, 64)
    q, s = quantize(w_narrow, "e4m3", "blockwise", block=(128, 128))
    assert s.shape == (2, 1)
    d = dequantize(q, s, block=(128, 128))
    assert (d - w_narrow).abs().max() <= w_narrow.abs().max() * E4M3.unit_roundoff * 1.01
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 256), "e4m3", "blockwise", block=(128, 128))


def test_nd_rowwise_scale_shape():
    x = torch.randn(2, 3, 64)
    q, s = quantize(x, "e4m3", "rowwise")
    assert s.shape == (2, 3, 1)
    q, s = quantize(x, "e4m3", "mx", block=(1, 32), pow2_scale=True)
    assert s.shape == (2, 3, 2)
    s_full = expand_scale(s, x.shape, (1, 32))
    bound = E4M3.unit_roundoff * x.abs() + E4M3.min_subnormal / 2 * s_full  # relative, or half a subnormal step
    assert ((dequantize(q, s, block=(1, 32)) - x).abs() <= bound * (1 + 1e-6)).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown element format"):
        quantize(torch.randn(4, 4), "e3m4")
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.randn(4, 4), "e4m3", "columnwise")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, 4, dtype=torch.int32))
