"""NE, AUC and calibration against scikit-learn (an independent implementation) to 1e-12."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from loka.gate import EvalOutputs, gate
from loka.gate.stats import auc, calibration, normalized_entropy, paired_bootstrap

sk_metrics = pytest.importorskip("sklearn.metrics")


def _sk_log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    # scikit-learn 1.9 renamed y_pred to y_proba; feature-check rather than version-check
    if "y_proba" in inspect.signature(sk_metrics.log_loss).parameters:
        return float(sk_metrics.log_loss(y, y_proba=p, labels=[0, 1], sample_weight=w))
    return float(sk_metrics.log_loss(y, p, labels=[0, 1], sample_weight=w))


def _sk_ne(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    rate = np.average(y, weights=w)
    return _sk_log_loss(y, p, w) / _sk_log_loss(y, np.full(y.shape, rate, dtype=np.float64), w)


def _confidently_wrong(seed: int, n: int = 1000, n_wrong: int = 5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    print("seed", seed)
    z = rng.normal(size=n) - 1.0
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    y[:2] = [0.0, 1.0]
    p = 1.0 / (1.0 + np.exp(-(z + rng.normal(0, 0.3, n))))
    wrong = rng.choice(np.arange(2, n), n_wrong, replace=False)
    # certain and almost-certain mistakes: exact 0/1, and values inside (0, 1e-7)
    p[wrong] = np.where(y[wrong] == 1.0, rng.choice([0.0, 1e-300, 1e-12], n_wrong), rng.choice([1.0, 1 - 1e-15], n_wrong))
    return y, p.astype(dtype)


@pytest.mark.parametrize("draw", range(3))
def test_ne_matches_sklearn_with_confident_mistakes(draw):
    y, p = _confidently_wrong(int(np.random.randint(2**31)))
    ref = _sk_ne(y, p)
    assert math.isfinite(ref)
    assert normalized_entropy(y, p) == pytest.approx(ref, rel=1e-12, abs=0)


def test_ne_issue_example_is_no_longer_forgiven():
    """5 confidently wrong predictions in 1,000: the old 1e-7 clip said NE 14% lower."""
    y, p = _confidently_wrong(17)
    y_eps, p_eps = y, np.clip(p, 1e-7, 1 - 1e-7)
    assert normalized_entropy(y, p) > 1.05 * _sk_ne(y_eps, p_eps)  # the old answer was far off


def test_ne_float32_predictions_clip_at_float32_eps():
    y, p64 = _confidently_wrong(5)
    p32 = p64.astype(np.float32)
    eps32 = float(np.finfo(np.float32).eps)
    # same clip as scikit-learn on float32 input, evaluated in float64 by both
    ref = _sk_ne(y, np.clip(p32.astype(np.float64), eps32, 1 - eps32))
    assert normalized_entropy(y, p32) == pytest.approx(ref, rel=1e-12)
    # scikit-learn itself computes in float32 there: agreement to float32 precision
    assert normalized_entropy(y, p32) == pytest.approx(_sk_ne(y, p32), rel=1e-5)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(np.random.randint(2**31))
    n = int(rng.integers(300, 3000))
    y = (rng.random(n) < 0.15).astype(np.float64)
    y[:2] = [0.0, 1.0]
    s = np.round(rng.normal(size=n) + 0.7 * y, 1)  # many ties
    assert auc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), rel=1e-12)


def test_calibration_matches_exact_sum_ratio():
    # scikit-learn has no sum(p)/sum(y); math.fsum is an exactly rounded independent reference
    y, p = _confidently_wrong(11)
    assert calibration(y, p) == pytest.approx(math.fsum(p) / math.fsum(y), rel=1e-12)


def test_bootstrap_point_values_match_sklearn():
    y, pa = _confidently_wrong(3)
    _, pb = _confidently_wrong(4)
    r = paired_bootstrap(y, pa, pb, "ne", n_boot=100, seed=0)
    assert r.value_a == pytest.approx(_sk_ne(y, pa), rel=1e-12)
    assert r.value_b == pytest.approx(_sk_ne(y, pb), rel=1e-12)
    assert np.isfinite(r.ci_lo) and np.isfinite(r.ci_hi)


def _gate_ne(y: np.ndarray, probs) -> float:
    ids = np.arange(y.size)
    out = EvalOutputs.build(ids, {"ctr": y}, {"ctr": probs})
    return gate(out, out, n_boot=100).checks[0].baseline


def test_gate_keeps_float32_predictions_for_the_clip(tmp_path):
    """EvalOutputs.build used to cast to float64 first: a clip at 2.2e-16, not float32's 1.2e-7."""
    y, p64 = _confidently_wrong(int(np.random.randint(2**31)))
    p32 = p64.astype(np.float32)
    out = EvalOutputs.build(np.arange(y.size), {"ctr": y}, {"ctr": p32})
    assert out.probs["ctr"].dtype == np.float32
    out.save(tmp_path / "o.npz")
    assert EvalOutputs.load(tmp_path / "o.npz").probs["ctr"].dtype == np.float32
    eps32 = float(np.finfo(np.float32).eps)
    ref = _sk_ne(y, np.clip(p32.astype(np.float64), eps32, 1 - eps32))
    assert _gate_ne(y, p32) == pytest.approx(ref, rel=1e-12)
    assert _gate_ne(y, p32) == pytest.approx(_sk_ne(y, p32), rel=1e-5)
    assert _gate_ne(y, p32.astype(np.float64)) > 1.02 * ref  # the float64 clip overstates it


def test_gate_ne_of_saturated_torch_sigmoids_matches_sklearn():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(np.random.randint(2**31))
    n = 2000
    logits = rng.normal(-1.0, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    y[:2] = [0.0, 1.0]
    wrong = rng.choice(np.arange(2, n), 8, replace=False)
    y[wrong] = [1.0, 0.0] * 4  # both kinds of confident error, whatever the draw (8% of draws had no label 1)
    logits[wrong] = np.where(y[wrong] == 1.0, -200.0, 60.0)  # float32 sigmoid saturates to exactly 0 / 1
    p_t = torch.sigmoid(torch.tensor(logits, dtype=torch.float32))
    assert {0.0, 1.0} <= set(p_t[wrong].tolist())
    p32 = p_t.numpy()
    eps32 = float(np.finfo(np.float32).eps)
    ref = _sk_ne(y, np.clip(p32.astype(np.float64), eps32, 1 - eps32))
    assert _gate_ne(y, p_t) == pytest.approx(ref, rel=1e-12)
    assert _gate_ne(y, p_t) == pytest.approx(_sk_ne(y, p32), rel=1e-5)
    # a float64 tensor stays float64 (it was cast to float32 before)
    p_t64 = torch.sigmoid(torch.tensor(logits, dtype=torch.float64))
    assert EvalOutputs.build(np.arange(n), {"ctr": y}, {"ctr": p_t64}).probs["ctr"].dtype == np.float64


def _weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """Importance weights as a down-sampled eval set has them, some zero, some large."""
    w = rng.exponential(1.0, n) * rng.choice([1.0, 10.0], n)
    w[rng.choice(n, n // 20, replace=False)] = 0.0
    return w


def test_weighted_ne_auc_calibration_match_sklearn():
    seed = int(np.random.randint(2**31))
    y, p = _confidently_wrong(seed)
    rng = np.random.default_rng(seed + 1)
    w = _weights(rng, y.size)
    w[:2] = 1.0  # keep one positive and one negative weighted
    assert normalized_entropy(y, p, weights=w) == pytest.approx(_sk_ne(y, p, w), rel=1e-12)
    s = np.round(p + 0.3 * rng.normal(size=y.size), 1)  # ties
    assert auc(y, s, weights=w) == pytest.approx(sk_metrics.roc_auc_score(y, s, sample_weight=w), rel=1e-12)
    assert calibration(y, p, weights=w) == pytest.approx(math.fsum(w * p) / math.fsum(w * y), rel=1e-12)
    # the bootstrap's point values are the weighted metrics, and its interval covers them
    _, pb = _confidently_wrong(seed + 2)
    for metric, ref_a, ref_b in (("ne", _sk_ne(y, p, w), _sk_ne(y, pb, w)),
                                 ("auc", sk_metrics.roc_auc_score(y, p, sample_weight=w),
                                  sk_metrics.roc_auc_score(y, pb, sample_weight=w))):
        r = paired_bootstrap(y, p, pb, metric, n_boot=200, seed=0, weights=w)
        assert (r.value_a, r.value_b) == (pytest.approx(ref_a, rel=1e-12), pytest.approx(ref_b, rel=1e-12))
        assert r.ci_lo <= r.diff <= r.ci_hi


def test_integer_weights_are_repeated_examples():
    rng = np.random.default_rng(np.random.randint(2**31))
    y, pa = _confidently_wrong(int(rng.integers(2**31)), n=600)
    w = rng.integers(0, 4, y.size).astype(np.float64)
    w[:2] = 1.0
    rep = np.repeat(np.arange(y.size), w.astype(int))
    for fn in (normalized_entropy, auc, calibration):
        assert fn(y, pa, weights=w) == pytest.approx(fn(y[rep], pa[rep]), rel=1e-12)


def test_bad_weights_are_refused():
    y, p = _confidently_wrong(1, n=100)
    for bad, match in (([1.0] * 3, "one weight per example"), (-np.ones(100), ">= 0"), (np.zeros(100), "not all zero")):
        with pytest.raises(ValueError, match=match):
            normalized_entropy(y, p, weights=bad)
