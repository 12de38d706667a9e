"""Operand statistics against direct float64 references, and merge == seeing everything."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from loka.quantize import fraction_underflow_saturate
from loka.probe.stats import LOG2_MIN, OperandStats, amax_drift


def _summary(*tensors, role="input"):
    s = OperandStats(role)
    for step, t in enumerate(tensors):
        s.update(t, step=step)
    return s, s.summary()


def test_moments_match_float64_reference():
    x = torch.distributions.StudentT(5.0).sample((96, 40)) * 0.3 + 0.05
    _, s = _summary(x)
    v = x.double().flatten().numpy()
    assert s["count"] == v.size and s["nonfinite"] == 0
    assert s["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
    assert s["rms"] == pytest.approx(math.sqrt((v * v).mean()), rel=1e-9)
    assert s["amax"] == pytest.approx(np.abs(v).max(), rel=1e-6)
    assert s["crest_factor"] == pytest.approx(np.abs(v).max() / math.sqrt((v * v).mean()), rel=1e-6)
    assert s["kurtosis"] == pytest.approx(sps.kurtosis(v, fisher=False), rel=1e-6)


def test_log2_histogram_counts_every_nonzero_finite_value():
    x = torch.randn(50, 30) * torch.logspace(-6, 3, 30)
    x[0, :5] = 0
    x[1, 0] = float("inf")
    _, s = _summary(x)
    counts = s["log2_hist"]["counts"]
    assert sum(counts) == x.numel() - 5 - 1
    assert s["zeros"] == 5 and s["nonfinite"] == 1
    v = x[torch.isfinite(x) & (x != 0)].abs().double()
    expected = torch.floor(torch.log2(v)).long() - LOG2_MIN
    assert counts == torch.bincount(expected, minlength=len(counts)).tolist()


@pytest.mark.parametrize("rows", [64, 1000])  # all rows counted / a strided subset (STATS_ROWS)
@pytest.mark.parametrize("role", ["input", "weight", "grad_output"])
def test_range_fractions_match_loka_quantize(rows, role):
    from loka.probe.stats import STATS_ROWS, _check_operand

    x = torch.randn(rows, 300) * torch.logspace(-12, 0, 300)  # wide range: tensorwise e4m3 underflows
    x[3] = 0.0
    _, s = _summary(x, role=role)
    kept = torch.arange(0, rows, -(-rows // STATS_ROWS)) if rows > STATS_ROWS else torch.arange(rows)
    for g in ("tensorwise", "rowwise", "blockwise", "mx"):
        for fmt in ("e4m3", "e5m2"):
            op = _check_operand(role, g, fmt)
            under = _underflow_on_rows(x, op, kept)
            assert s["underflow"][fmt][g] == pytest.approx(under, abs=1e-12), (g, fmt)
    assert s["underflow"]["e4m3"]["tensorwise"] > s["underflow"]["e4m3"]["mx"]
    if rows <= STATS_ROWS:  # whole operand: the same number as loka.quantize's own helper
        under, _ = fraction_underflow_saturate(x, _check_operand(role, "rowwise", "e4m3"))
        assert s["underflow"]["e4m3"]["rowwise"] == pytest.approx(under, abs=1e-12)


def _underflow_on_rows(x, op, kept):
    """Reference: scales from the whole operand (fp64), underflow counted on the ``kept`` rows only."""
    from loka.formats import get_format
    from loka.quantize import group_shape, expand_scale, group_amax, scale_from_amax

    f = get_format(op.format)
    group = group_shape(x.shape, op.granularity, op.block)
    scale = expand_scale(scale_from_amax(group_amax(x, op.granularity, op.block), f, op.pow2), x.shape, group)
    y = (x.double() / scale.double()).abs()[kept]
    nz = x[kept] != 0
    return float(((y < f.min_subnormal / 2) & nz).sum()) / float(nz.sum())


def test_outlier_channels_and_spread():
    x = torch.randn(128, 64)
    x[:, 7] *= 50
    x[:, 20] *= 30
    _, s = _summary(x)
    assert s["outlier_channels"][:2] == [7, 20]
    assert s["col_amax_spread"] > 10


def test_amax_drift_and_delayed_saturation():
    a, b = torch.randn(32, 16), torch.randn(32, 16) * 8
    _, s = _summary(a, b)
    expected = abs(math.log2(b.abs().max().item() / a.abs().max().item()))
    assert s["amax_drift_log2"] == pytest.approx(expected, rel=1e-6)
    over = int((b.abs() > a.abs().max()).sum())
    assert s["saturation_delayed"] == pytest.approx(over / (a.numel() + b.numel()))
    assert amax_drift({0: 1.0}) == 0.0


def test_merge_of_halves_equals_seeing_everything():
    x = torch.randn(80, 48) * 2
    x[3, 3] = float("nan")
    whole, _ = _summary(x)
    left, _ = _summary(x[:40])
    right, _ = _summary(x[40:])
    merged = left.merge(right)
    for key, value in whole.state.items():
        if key.startswith(("row_spread", "range_n", "under/", "sat/")) and "tensorwise" not in key:
            continue  # per-row quantities depend on the split by construction; checked below
        if key in ("s1", "s2", "s3", "s4"):
            torch.testing.assert_close(merged.state[key], value, rtol=1e-12, atol=1e-9)
        elif key.startswith(("under/", "sat/")):
            continue  # tensorwise scale of a half differs from the whole: not mergeable exactly
        else:
            assert torch.equal(merged.state[key], value), key
    # Row-group fractions (rowwise/blockwise 1xK/mx) only depend on the rows themselves.
    for g in ("rowwise", "mx"):
        k = f"under/e4m3/{g}"
        assert torch.equal(merged.state[k], whole.state[k])


def test_channel_count_change_is_a_clear_error():
    s = OperandStats("input")
    s.update(torch.randn(4, 8), step=0)
    with pytest.raises(ValueError, match="channel count changed"):
        s.update(torch.randn(4, 9), step=1)


@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf", "all"])
def test_statistics_with_and_without_nonfinite_values_match_float64(bad):
    """The all-finite fast path and the masked path give the same numbers as numpy on the finite values."""
    from loka.probe.capture import exact_counts

    x = torch.randn(37, 19) * torch.logspace(-3, 2, 19)
    if bad == "all":
        x.fill_(float("nan"))
    elif bad is not None:
        idx = torch.randperm(x.numel())[:5]
        x.view(-1)[idx] = float(bad)
    _, s = _summary(x)
    v = x.double().flatten().numpy()
    fin = v[np.isfinite(v)]
    assert s["count"] == v.size and s["nonfinite"] == v.size - fin.size
    counts = exact_counts(x)
    assert counts[0] == v.size and counts[1] == v.size - fin.size
    if fin.size:
        assert s["amax"] == pytest.approx(np.abs(fin).max(), rel=1e-6)
        assert counts[2] == pytest.approx(np.abs(fin).max(), rel=1e-6)
        assert s["min"] == pytest.approx(fin.min(), rel=1e-6) and s["max"] == pytest.approx(fin.max(), rel=1e-6)
        assert s["mean"] == pytest.approx(fin.mean(), rel=1e-9, abs=1e-12)
    else:
        assert s["amax"] == 0 and counts[2] == 0
