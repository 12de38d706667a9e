"""Fitted operand distributions: predict FP8 error offline and synthesize realistic inputs.

The probe keeps a random subset of each operand's values; :func:`fit_values` fits
scipy.stats families to them and ranks the fits by the Kolmogorov-Smirnov statistic
(smaller is better). Families:

- ``normal``, ``laplace``, ``t`` (Student-t): fitted to the signed values.
- ``lognorm``: fitted to |x| of the nonzero values (location 0), with the fraction of
  zeros and of positive values kept, so ReLU-like and one-signed operands are modelled.

A fit is then used (a) to predict the FP8 error of a recipe that was not measured on
the real operands (:func:`predict_gemm_error`: sample operands of the site's shape,
quantize with the recipe, compare with fp64) and (b) to synthesize inputs for kernel
timing (:meth:`Fit.sample`). Values are i.i.d.: a fit does not model outlier channels,
so predictions for rowwise vs tensorwise on operands with outlier channels should be
checked against the measured ``col_amax_spread`` (see docs/probe.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loka.probe.error import gemm_error
from loka.recipe import GEMM_ROLES, GemmRecipe

FAMILIES = ("normal", "laplace", "t", "lognorm")


def _scipy(family: str):
    """The scipy.stats distribution of ``family`` (scipy is imported on first use)."""
    from scipy import stats as sps  # heavy: scipy, on first use

    return {"normal": sps.norm, "laplace": sps.laplace, "t": sps.t, "lognorm": sps.lognorm}[family]


@dataclass(frozen=True)
class Fit:
    """One fitted family: scipy ``params``, KS statistic, and sign/zero fractions (lognorm)."""

    family: str
    params: tuple[float, ...]
    ks: float
    n: int
    p_zero: float = 0.0
    p_pos: float = 0.5

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not valid; use one of {list(FAMILIES)}")

    def sample(self, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        """``shape`` float32 values drawn from the fit (i.i.d.)."""
        rng = np.random.default_rng(seed)
        n = math.prod(shape)
        dist = _scipy(self.family)(*self.params)
        if self.family != "lognorm":
            v = dist.rvs(size=n, random_state=rng)
        else:
            mag = dist.rvs(size=n, random_state=rng)
            sign = np.where(rng.random(n) < self.p_pos / max(1 - self.p_zero, 1e-12), 1.0, -1.0)
            v = np.where(rng.random(n) < self.p_zero, 0.0, sign * mag)
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.from_numpy(v.astype(np.float32)).reshape(shape)

    def to_dict(self) -> dict:
        return {"family": self.family, "params": list(self.params), "ks": self.ks, "n": self.n,
                "p_zero": self.p_zero, "p_pos": self.p_pos}

    @classmethod
    def from_dict(cls, d: dict) -> "Fit":
        return cls(d["family"], tuple(d["params"]), d["ks"], d["n"], d.get("p_zero", 0.0), d.get("p_pos", 0.5))


# Student-t has no closed-form fit and its optimizer is the slow part, so it sees at most this
# many values. Not fewer than the probe keeps per operand (ProbeConfig.fit_values): fitted on a
# 1000-value subset, t lost to Laplace on t-distributed data in about a third of the draws.
T_FIT_VALUES = 4096
T_NORMAL_DF = 30.0  # a t fit with more degrees of freedom than this is reported as the normal fit


def _fit_one(family: str, v: np.ndarray) -> Fit | None:
    from scipy import stats as sps  # heavy: scipy, on first use

    if family != "lognorm":
        sub = v[:: max(1, v.size // T_FIT_VALUES)] if family == "t" else v
        params = _scipy(family).fit(sub)
        ks = sps.kstest(v, _scipy(family)(*params).cdf).statistic
        return Fit(family, tuple(float(p) for p in params), float(ks), v.size)
    mag = np.abs(v[v != 0])
    if mag.size < 8:
        return None
    params = sps.lognorm.fit(mag, floc=0)
    # KS on |x| against the magnitude model (the sign is modelled separately, exactly).
    ks = sps.kstest(mag, sps.lognorm(*params).cdf).statistic
    return Fit("lognorm", tuple(float(p) for p in params), float(ks), v.size,
               p_zero=float(np.mean(v == 0)), p_pos=float(np.mean(v > 0)))


def fit_values(values: torch.Tensor, families: tuple[str, ...] = FAMILIES) -> list[Fit]:
    """Fits of every family to ``values`` (finite ones), best (smallest KS) first."""
    v = values.detach().double().flatten().cpu().numpy()
    v = v[np.isfinite(v)]
    if v.size < 8 or np.all(v == v[0]):
        return []
    fits = []
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is not valid; use one of {list(FAMILIES)}")
        with np.errstate(all="ignore"):
            f = _fit_one(family, v)
        if f is not None and math.isfinite(f.ks):
            fits.append(f)
    if any(f.family == "normal" for f in fits):
        # A Student-t with many degrees of freedom is a normal with one parameter more: on normal
        # data it wins the KS ranking by noise (about 1e-3) about half the time. Keep it only
        # where its tails differ from the normal's.
        fits = [f for f in fits if not (f.family == "t" and f.params[0] > T_NORMAL_DF)]
    return sorted(fits, key=lambda f: f.ks)


def predict_gemm_error(
    fit_a: Fit, fit_b: Fit, recipe: GemmRecipe, shape: tuple[int, int, int], *, trials: int = 3, seed: int = 0,
    max_rows: int = 1024,
) -> float:
    """Mean relative error of ``a[M,K] · b[N,K]ᵀ`` under ``recipe`` on operands drawn from the fits."""
    m, k, n = shape
    errs = []
    for t in range(trials):
        a = fit_a.sample((m, k), seed=seed + 2 * t)
        b = fit_b.sample((n, k), seed=seed + 2 * t + 1)
        errs.append(gemm_error(a, b, recipe, max_rows=max_rows)[0])
    return float(np.mean(errs))


def gemm_fits(fits: dict[str, Fit], gemm: str) -> tuple[Fit, Fit] | None:
    """The (a, b) operand fits of ``gemm`` from per-role fits, None when one is missing."""

    a_role, b_role = GEMM_ROLES[gemm]
    if a_role not in fits or b_role not in fits:
        return None
    return fits[a_role], fits[b_role]

