"""MI300's fnuz FP8, FP4 (e2m1) and e8m0 scales, checked code for code against ml_dtypes.

ml_dtypes (float8_e4m3fnuz, float8_e5m2fnuz, float4_e2m1fn, float8_e8m0fnu) is an independent
implementation of each encoding: every code of every format, every binade, the ties between
neighbours and the edges (zero, subnormals, max, NaN/Inf) go through loka's saturating cast and
through "clamp finite values, then ml_dtypes" and must give the same bits.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from loka.formats import (
    as_e8m0,
    e2m1_values,
    e8m0_codes,
    e8m0_to_float,
    get_format,
    pack_fp4,
    round_stochastic,
    round_to_format,
    unpack_fp4,
)
from loka.quantize import dequantize, fake_quantize, quantize, quantize_operand, saturated_cast
from loka.recipe import OperandRecipe

NEW = {"e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "e5m2fnuz": ml_dtypes.float8_e5m2fnuz, "e2m1": ml_dtypes.float4_e2m1fn}


def grid(fmt: str) -> np.ndarray:
    """Every finite value of ``fmt`` (from ml_dtypes, by decoding every code)."""
    n = 16 if fmt == "e2m1" else 256
    v = np.arange(n, dtype=np.uint8).view(NEW[fmt]).astype(np.float32)
    return np.unique(v[np.isfinite(v)])


def probe_values(fmt: str, n: int = 4096) -> torch.Tensor:
    """Every value of the format, the midpoints (ties) and one float32 ulp either side of them,
    random values over every binade from below the smallest subnormal to above max, and edges."""
    f = get_format(fmt)
    v = np.abs(grid(fmt))
    v = np.unique(v)
    mid = ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)
    pts = np.concatenate([v, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    log2 = np.random.uniform(math.log2(f.min_subnormal) - 4, math.log2(f.max) + 4, n)
    rand = np.exp2(log2).astype(np.float32)
    edges = np.array([0.0, f.min_subnormal, f.min_subnormal / 2, f.min_normal, f.max, f.max * 1.01, 3e38,
                      np.inf, np.nan, 1e-40], np.float32)
    x = np.concatenate([pts, rand, edges])
    return torch.from_numpy(np.concatenate([x, -x]).astype(np.float32))


def oracle_codes(x: torch.Tensor, fmt: str) -> np.ndarray:
    """Clamp finite values to ±max (FP4: ±Inf too, as ml_dtypes saturates them), cast with ml_dtypes."""
    f = get_format(fmt)
    v = x.numpy()
    if fmt == "e2m1":
        clamped = np.clip(v, -f.max, f.max)
    else:
        clamped = np.where(np.isfinite(v), np.clip(v, -f.max, f.max), v)
    return clamped.astype(NEW[fmt]).view(np.uint8)


def codes(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy()


@pytest.mark.parametrize("fmt", sorted(NEW))
def test_limits_match_ml_dtypes(fmt):
    f, info = get_format(fmt), ml_dtypes.finfo(NEW[fmt])
    assert (f.max, f.min_normal, f.min_subnormal) == (float(info.max), float(info.smallest_normal),
                                                     float(info.smallest_subnormal))
    assert f.mantissa_bits == info.nmant and f.emax == int(math.log2(info.max)) and f.bits == info.bits


@pytest.mark.parametrize("fmt", sorted(NEW))
def test_saturated_cast_codes_match_ml_dtypes(fmt):
    x = probe_values(fmt)
    ours, ref = codes(saturated_cast(x, fmt)), oracle_codes(x, fmt)
    nan = torch.isnan(x).numpy()
    if fmt == "e2m1":  # no NaN code: loka writes -0 (code 8); ml_dtypes -0 for +NaN and +0 for -NaN
        assert (ours[nan] == 8).all() and np.isin(ref[nan], (0, 8)).all()
        ours, ref = ours[~nan], ref[~nan]
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("fmt", sorted(NEW))
def test_every_code_round_trips(fmt):
    """Each finite value decodes (ml_dtypes) and re-encodes (loka) to its own code."""
    n = 16 if fmt == "e2m1" else 256
    all_codes = np.arange(n, dtype=np.uint8)
    values = all_codes.view(NEW[fmt]).astype(np.float32)
    finite = np.isfinite(values)
    ours = codes(saturated_cast(torch.from_numpy(values[finite]), fmt))
    expect = all_codes[finite]
    if fmt != "e2m1":  # fnuz: no -0, one NaN (0x80)
        assert (~finite).sum() == 1 and all_codes[~finite][0] == 0x80
    np.testing.assert_array_equal(ours, expect)


@pytest.mark.parametrize("fmt", ["e4m3fnuz", "e5m2fnuz"])
def test_fnuz_has_no_negative_zero_and_inf_becomes_nan(fmt):
    q = saturated_cast(torch.tensor([-0.0, -1e-30, math.inf, -math.inf, math.nan, -1e6]), fmt)
    assert codes(q).tolist() == [0, 0, 0x80, 0x80, 0x80, codes(saturated_cast(torch.tensor([-1e6]), fmt))[0]]
    assert float(q[-1].float()) == -get_format(fmt).max


@pytest.mark.parametrize("fmt", sorted(NEW))
def test_round_to_format_matches_ml_dtypes(fmt):
    f = get_format(fmt)
    x = probe_values(fmt)
    x = x[torch.isfinite(x)].clamp(-f.max, f.max)
    ref = x.numpy().astype(NEW[fmt]).astype(np.float32)
    np.testing.assert_array_equal(round_to_format(x, fmt).numpy(), ref)  # -0 == 0: values, not codes


@pytest.mark.parametrize("fmt", sorted(NEW))
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(fmt):
    f = get_format(fmt)
    g = torch.from_numpy(grid(fmt))
    x = torch.empty(64).uniform_(-f.max, f.max)
    x[:4] = torch.tensor([f.max, -f.max, f.min_subnormal / 3, 0.0])
    draws = torch.stack([round_stochastic(x, fmt) for _ in range(2000)])
    down = torch.from_numpy(np.array([g[g <= v].max() for v in x.numpy()]))
    up = torch.from_numpy(np.array([g[g >= v].min() for v in x.numpy()]))
    assert bool(((draws == down) | (draws == up)).all())
    spacing = (up - down).clamp_min(1e-30)
    sigma = spacing / 2 / math.sqrt(2000)  # a draw's standard deviation is at most spacing / 2
    assert bool(((draws.mean(0) - x).abs() <= 6 * sigma + 1e-7).all())
    assert not bool((draws == x).all())  # it does round (x is almost never on the grid)


def test_e8m0_codes_match_ml_dtypes_for_every_power_of_two():
    exps = np.arange(-127, 128)
    scales = np.ldexp(np.float32(1), exps).astype(np.float32)
    ref = scales.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    ours = e8m0_codes(torch.from_numpy(scales))
    np.testing.assert_array_equal(ours.numpy(), ref)
    np.testing.assert_array_equal(as_e8m0(torch.from_numpy(scales)).float().numpy(), scales)
    back = e8m0_to_float(torch.arange(256, dtype=torch.int32).to(torch.uint8)).numpy()
    ref_back = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(back, ref_back)  # code 255 is NaN in both


def test_pack_fp4_layout_and_round_trip():
    c = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    packed = pack_fp4(c)
    assert packed.dtype == torch.float4_e2m1fn_x2 and tuple(packed.shape) == (5, 17)
    assert torch.equal(unpack_fp4(packed), c)
    assert int(packed.view(torch.uint8)[0, 0]) == int(c[0, 0]) | (int(c[0, 1]) << 4)  # element 0: low nibble
    with pytest.raises(ValueError, match="even last dim"):
        pack_fp4(c[:, :3])
    np.testing.assert_array_equal(e2m1_values(c).numpy(), c.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32))


def oracle_scale(amax: np.ndarray, fmt: str) -> np.ndarray:
    """loka's FP8 scale rule in float64, rounded once to float32 (as tests/core/test_quantize_oracle)."""
    rcp = np.float64(np.float32(1.0 / np.float64(get_format(fmt).max)))
    scale = np.where(amax > 0, amax.astype(np.float64) * rcp, 1.0).astype(np.float32)
    return np.maximum(scale, np.float32(2.0**-126))


@pytest.mark.parametrize("fmt", ["e4m3fnuz", "e5m2fnuz"])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise"])
def test_fnuz_quantize_matches_oracle(fmt, granularity):
    rows, cols = 19, 200  # not a multiple of the 1x128 block
    x = torch.randn(rows, cols) * torch.exp2(torch.randint(-20, 20, (rows, 1)).float())
    x[2] = 0.0
    x[3, :3] = torch.tensor([math.inf, math.nan, -0.0])
    q, scale = quantize(x, fmt, granularity)
    v = x.numpy()
    ax = np.where(np.isfinite(v), np.abs(v), 0).astype(np.float32)
    if granularity == "tensorwise":
        amax, per_elem = ax.max(), None
    elif granularity == "rowwise":
        amax = ax.max(axis=1, keepdims=True)
    else:
        padded = np.pad(ax, ((0, 0), (0, 256 - cols)))
        amax = padded.reshape(rows, 2, 128).max(axis=2)
    ref_scale = oracle_scale(amax, fmt)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    per_elem = ref_scale if granularity != "blockwise" else np.repeat(ref_scale, 128, axis=1)[:, :cols]
    ref = oracle_codes(torch.from_numpy((v / per_elem).astype(np.float32)), fmt)
    np.testing.assert_array_equal(codes(q), ref)
    # the emulated cast is the dequantized cast, value for value
    op = OperandRecipe(format=fmt, granularity=granularity)
    deq = dequantize(*quantize_operand(x, op), block=None if granularity != "blockwise" else (1, 128)).numpy()
    fq = fake_quantize(x, op).numpy()
    np.testing.assert_array_equal(np.isnan(fq), np.isnan(deq))
    np.testing.assert_array_equal(fq[~np.isnan(fq)], deq[~np.isnan(deq)])
