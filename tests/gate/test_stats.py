"""Metrics and paired bootstrap vs direct formulas, scipy and a coverage experiment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from loka.gate.stats import auc, calibration, normalized_entropy, paired_bootstrap


def _synthetic(rng: np.random.Generator, n: int, shift: float = 0.0, noise: float = 0.3):
    """Labels from a true logit; model a is slightly noisy, model b noisier/shifted."""
    z = rng.normal(size=n) - 1.5
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    pa = 1.0 / (1.0 + np.exp(-(z + rng.normal(0, noise, n))))
    pb = 1.0 / (1.0 + np.exp(-(z + shift + rng.normal(0, noise, n))))
    return y, pa, pb


def test_ne_matches_direct_formula():
    rng = np.random.default_rng(np.random.randint(2**31))
    y, p, _ = _synthetic(rng, 5000)
    rate = y.mean()
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    ref = logloss / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert normalized_entropy(y, p) == pytest.approx(ref, rel=1e-12)
    # predicting the base rate everywhere gives NE = 1 exactly
    assert normalized_entropy(y, np.full_like(p, rate)) == pytest.approx(1.0, rel=1e-12)


def test_ne_clips_certain_wrong_predictions():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    p = np.array([0.0, 1.0, 1.0, 0.0])  # two certain mistakes: would be infinite without clipping
    ne = normalized_entropy(y, p)
    assert np.isfinite(ne) and ne > 1.0


def test_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(np.random.randint(2**31))
    n = int(rng.integers(200, 2000))
    y = (rng.random(n) < 0.2).astype(np.float64)
    y[:2] = [0.0, 1.0]
    s = np.round(rng.normal(size=n) + 0.5 * y, 1)  # rounding creates many ties
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert auc(y, s) == pytest.approx(u / (y.sum() * (n - y.sum())), rel=1e-12)


def test_auc_brute_force_pairs_and_extremes():
    rng = np.random.default_rng(np.random.randint(2**31))
    y = (rng.random(300) < 0.4).astype(np.float64)
    y[:2] = [0.0, 1.0]
    s = rng.integers(0, 5, 300).astype(np.float64)
    pos, neg = s[y == 1], s[y == 0]
    ref = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(y, s) == pytest.approx(ref, rel=1e-12)
    assert auc(y, y) == 1.0 and auc(y, -y) == 0.0 and auc(y, np.zeros_like(y)) == 0.5


def test_calibration_is_sum_ratio():
    rng = np.random.default_rng(np.random.randint(2**31))
    y, p, _ = _synthetic(rng, 1000)
    assert calibration(y, p) == pytest.approx(p.sum() / y.sum(), rel=1e-12)


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "only one class"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 or 1"),
        ([0, 1], [0.1, 0.2, 0.3], "same examples"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], [0.1, 1.5], r"\[0, 1\]"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        normalized_entropy(labels, probs)


def test_identical_models_have_zero_difference():
    rng = np.random.default_rng(np.random.randint(2**31))
    y, p, _ = _synthetic(rng, 2000)
    for metric in ("ne", "auc", "calibration"):
        r = paired_bootstrap(y, p, p.copy(), metric=metric, n_boot=200)
        assert r.diff == 0.0 and abs(r.ci_lo) < 1e-12 and abs(r.ci_hi) < 1e-12


def test_point_estimates_and_interval_order():
    rng = np.random.default_rng(np.random.randint(2**31))
    y, pa, pb = _synthetic(rng, 4000, shift=0.2)
    for metric, fn in (("ne", normalized_entropy), ("auc", auc), ("calibration", calibration)):
        r = paired_bootstrap(y, pa, pb, metric=metric, n_boot=300)
        assert r.value_a == pytest.approx(fn(y, pa)) and r.value_b == pytest.approx(fn(y, pb))
        assert r.rel_diff == pytest.approx((r.value_b - r.value_a) / r.value_a)
        assert r.ci_lo <= r.diff <= r.ci_hi and r.rel_ci_lo <= r.rel_diff <= r.rel_ci_hi


def test_auc_interval_matches_delong_variance():
    """The AUC resampling uses placement values, so its SE must equal DeLong's paired SE."""
    rng = np.random.default_rng(np.random.randint(2**31))
    y, pa, pb = _synthetic(rng, 3000, noise=0.6)
    r = paired_bootstrap(y, pa, pb, metric="auc", n_boot=2000)
    pos, neg = y == 1, y == 0

    def placements(s):
        sp, sn = s[pos], s[neg]
        v10 = ((sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])).mean(1)
        v01 = ((sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])).mean(0)
        return v10, v01

    a10, a01 = placements(pa)
    b10, b01 = placements(pb)
    var = np.var(b10 - a10, ddof=1) / pos.sum() + np.var(b01 - a01, ddof=1) / neg.sum()
    assert r.diff_se == pytest.approx(np.sqrt(var), rel=0.1)


def test_grouped_resampling_keeps_the_standard_error():
    rng = np.random.default_rng(np.random.randint(2**31))
    y, pa, pb = _synthetic(rng, 60_000, shift=0.05)
    exact = paired_bootstrap(y, pa, pb, n_boot=1000, max_units=100_000)
    grouped = paired_bootstrap(y, pa, pb, n_boot=1000, max_units=2000)
    assert grouped.n_units == 2000 and exact.n_units == 60_000
    assert grouped.rel_se == pytest.approx(exact.rel_se, rel=0.15)


def test_coverage_of_known_difference():
    """95% intervals from small samples cover the population NE difference ~95% of the time."""
    rng = np.random.default_rng(np.random.randint(2**31))
    y, pa, pb = _synthetic(rng, 1_000_000, shift=0.15)
    truth = normalized_entropy(y, pb) / normalized_entropy(y, pa) - 1.0
    covered, trials = 0, 60
    for _ in range(trials):
        idx = rng.integers(0, y.size, 3000)
        r = paired_bootstrap(y[idx], pa[idx], pb[idx], n_boot=200, seed=int(rng.integers(1 << 31)))
        covered += r.rel_ci_lo <= truth <= r.rel_ci_hi
    assert 0.8 <= covered / trials <= 1.0
    assert truth > 0.0  # the shifted model really is worse, so the test is not vacuous


def test_bootstrap_rejects_bad_settings():
    y = np.array([0.0, 1.0] * 50)
    p = np.full(100, 0.5)
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap(y, p, p, metric="logloss")
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(y, p, p, n_boot=5)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(y, p, p, confidence=1.5)


def test_few_positives_drop_single_class_resamples():
    rng = np.random.default_rng(np.random.randint(2**31))
    n = 400
    y = np.zeros(n)
    y[rng.choice(n, 3, replace=False)] = 1.0  # about 5% of resamples have no positive
    pa, pb = rng.random(n), rng.random(n)
    r = paired_bootstrap(y, pa, pb, metric="auc", n_boot=400)
    assert 0 < r.n_single_class < 100 and np.isfinite(r.ci_lo) and np.isfinite(r.ci_hi)
    with pytest.raises(ValueError, match="only one class"):
        paired_bootstrap(np.zeros(n), pa, pb, metric="auc")


def test_baseline_auc_or_calibration_of_zero_gives_an_absolute_interval():
    """A baseline of exactly 0 has no relative change; it used to be called a single-class eval set."""
    rng = np.random.default_rng(np.random.randint(2**31))
    y, _, pb = _synthetic(rng, 3000)
    inverted = 1.0 - y * 0.9 - rng.random(y.size) * 0.05  # every negative above every positive: AUC 0
    r = paired_bootstrap(y, inverted, pb, metric="auc", n_boot=200)
    assert r.value_a == 0.0 and r.diff == pytest.approx(auc(y, pb), abs=1e-12)
    assert r.ci_lo <= r.diff <= r.ci_hi and r.ci_lo > 0
    assert np.isnan(r.rel_diff) and np.isnan(r.rel_ci_lo) and r.n_single_class == 0
    c = paired_bootstrap(y, np.zeros(y.size), pb, metric="calibration", n_boot=200)
    assert c.value_a == 0.0 and c.ci_lo <= c.diff <= c.ci_hi and np.isnan(c.rel_diff)


def test_gate_reports_a_zero_baseline_calibration():
    from loka.gate import EvalOutputs, gate

    rng = np.random.default_rng(np.random.randint(2**31))
    y, _, pb = _synthetic(rng, 3000)
    ids = np.arange(y.size)
    base = EvalOutputs.build(ids, {"ctr": y}, {"ctr": np.zeros(y.size)})
    cand = EvalOutputs.build(ids, {"ctr": y}, {"ctr": pb})
    res = gate(base, cand, n_boot=200, calibration_abs=0.01)
    cal = next(c for c in res.checks if c.name == "calibration[ctr]")
    assert cal.baseline == 0.0 and cal.verdict == "regression"
    assert "single class" not in res.table()
