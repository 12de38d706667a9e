"""Fitted distributions: the right family wins, and predicted FP8 error matches measured error."""

import numpy as np
import pytest
import torch

from loka.recipe import Recipe
from loka.probe.error import gemm_error
from loka.probe.fit import Fit, fit_values, predict_gemm_error

# Stated tolerance: prediction from a fit within 10% (relative) of the error measured on
# data drawn from the same known distribution, at 128-256 rows (sampling noise ~2-3%).
PREDICTION_RTOL = 0.10


def _t(shape, df=4.0, scale=0.5):
    return torch.distributions.StudentT(df).sample(shape) * scale


@pytest.mark.parametrize(
    "make, family",
    [(lambda n: torch.randn(n) * 3 + 1, "normal"), (lambda n: _t((n,), df=3.0), "t"),
     (lambda n: torch.distributions.Laplace(0.0, 2.0).sample((n,)), "laplace"),
     (lambda n: torch.exp(torch.randn(n) * 1.5 - 2), "lognorm")],
)
def test_best_fit_recovers_the_family(make, family):
    fits = fit_values(make(4000))
    assert fits[0].family == family, [(f.family, f.ks) for f in fits]
    assert fits[0].ks < 0.03
    assert [f.ks for f in fits] == sorted(f.ks for f in fits)


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "mx"])
def test_predicted_error_agrees_with_measured(name):
    x = _t((256, 128))
    w = torch.randn(192, 128) * 0.05
    fx, fw = fit_values(x.flatten()[:4096])[0], fit_values(w.flatten()[:4096])[0]
    g = Recipe.from_name(name).fprop
    measured = gemm_error(x, w, g)[0]
    predicted = predict_gemm_error(fx, fw, g, (256, 128, 192), trials=3)
    assert predicted == pytest.approx(measured, rel=PREDICTION_RTOL)


def test_relu_like_values_keep_zero_and_sign_fractions():
    r = torch.relu(torch.randn(5000))
    f = next(f for f in fit_values(r) if f.family == "lognorm")
    assert f.p_zero == pytest.approx(0.5, abs=0.03) and f.p_pos == pytest.approx(1 - f.p_zero)
    s = f.sample((4000,), seed=1)
    assert (s == 0).float().mean().item() == pytest.approx(f.p_zero, abs=0.03)
    assert (s < 0).sum().item() == 0


def test_fit_roundtrip_and_degenerate_inputs():
    f = fit_values(torch.randn(500))[0]
    assert Fit.from_dict(f.to_dict()) == f
    assert fit_values(torch.zeros(100)) == []
    assert fit_values(torch.tensor([1.0, float("nan")])) == []
    with pytest.raises(ValueError, match="family"):
        fit_values(torch.randn(100), families=("gamma",))
    s = f.sample((3, 4), seed=0)
    assert s.shape == (3, 4) and torch.isfinite(s).all() and np.isfinite(s.numpy()).all()
