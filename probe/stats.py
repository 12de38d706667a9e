"""Streaming, mergeable statistics of one operand (input, weight or grad_output) of a site.

Each statistic is defined once as a pair, like Transformer Engine's debug features:
``compute`` turns one 2-D tensor into a small *state* (a dict of float64 tensors) and
every state key says how it merges (``sum``, ``max`` or ``min``). The same merge rule
serves micro-batches on one process (:meth:`OperandStats.merge`) and DDP ranks
(``torch.distributed.all_reduce`` with the matching op, see :mod:`loka.probe.distributed`),
so "merge two halves" and "see both halves" give the same numbers (weights, replicated on
every rank, are averaged across ranks instead of summed).

Moments are kept as raw power sums in float64 (sum x, x², x³, x⁴), which merge by
addition; mean, RMS, crest factor and kurtosis are derived from them at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from loka.quantize import fraction_underflow_saturate
from loka.recipe import GRANULARITIES, Recipe

# log2-magnitude histogram: bin i counts nonzero finite values with floor(log2|x|) == LOG2_MIN + i,
# clamped at both ends; exact zeros are counted separately.
LOG2_MIN, LOG2_MAX = -48, 24
N_LOG2_BINS = LOG2_MAX - LOG2_MIN + 1
FORMATS_CHECKED = ("e4m3", "e5m2")
MERGE_OPS = ("sum", "max", "min")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Statistic:
    """One statistic: ``compute(x2d) -> state`` and the merge op of every state key."""

    name: str
    compute: Callable[[torch.Tensor, str], State]
    merge_ops: dict[str, str]


def _f64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).cpu()


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x[torch.isfinite(x)]


def _moments(x: torch.Tensor, role: str) -> State:
    xf = _finite(x).double()
    return {
        "count": _f64(x.numel()),
        "nonfinite": _f64(x.numel() - xf.numel()),
        "zeros": _f64(int((xf == 0).sum())),
        "s1": xf.sum().cpu(),
        "s2": (xf * xf).sum().cpu(),
        "s3": (xf**3).sum().cpu(),
        "s4": (xf**4).sum().cpu(),
    }


def _extremes(x: torch.Tensor, role: str) -> State:
    xf = _finite(x).float()
    if xf.numel() == 0:
        return {"amax": _f64(0.0), "min": _f64(math.inf), "max": _f64(-math.inf)}
    return {"amax": _f64(xf.abs().max().item()), "min": _f64(xf.min().item()), "max": _f64(xf.max().item())}


def _log2_hist(x: torch.Tensor, role: str) -> State:
    xf = _finite(x).float()
    xf = xf[xf != 0]
    _, exp = torch.frexp(xf)  # |x| = m * 2**exp, m in [0.5, 1) -> floor(log2|x|) = exp - 1
    idx = (exp - 1).clamp(LOG2_MIN, LOG2_MAX) - LOG2_MIN
    return {"log2_hist": torch.bincount(idx.long().cpu(), minlength=N_LOG2_BINS).double()}


def _channel_amax(x: torch.Tensor, role: str) -> State:
    """Per-column amax (channels along the reduction dim) and the worst row's amax spread."""
    ax = x.detach().abs().float()
    ax = torch.where(torch.isfinite(ax), ax, torch.zeros((), device=ax.device))
    if ax.numel() == 0:
        return {"col_amax": torch.zeros(x.shape[-1], dtype=torch.float64), "row_spread_max": _f64(1.0)}
    row = ax.amax(dim=1)
    med = row.median().item()
    spread = row.max().item() / med if med > 0 else (1.0 if row.max().item() == 0 else math.inf)
    return {"col_amax": ax.amax(dim=0).double().cpu(), "row_spread_max": _f64(spread)}


def _check_operand(role: str, granularity: str, fmt: str):
    """The operand recipe a named recipe uses for ``role``, in ``fmt`` (for underflow/saturation)."""
    recipe = Recipe.from_name(granularity)
    op = recipe.fprop.a if role == "input" else recipe.fprop.b if role == "weight" else recipe.dgrad.a
    return replace(op, format=fmt)


def _range_fractions(x: torch.Tensor, role: str) -> State:
    xf = x.detach().float()
    n = int((torch.isfinite(xf) & (xf != 0)).sum())
    out: State = {"range_n": _f64(n)}
    for fmt in FORMATS_CHECKED:
        for g in GRANULARITIES:
            under, sat = fraction_underflow_saturate(xf, _check_operand(role, g, fmt))
            # fraction * n recovers the integer counts exactly, and counts merge by addition.
            out[f"under/{fmt}/{g}"] = _f64(round(under * n))
            out[f"sat/{fmt}/{g}"] = _f64(round(sat * n))
    return out


def _range_keys() -> dict[str, str]:
    keys = {"range_n": "sum"}
    for fmt in FORMATS_CHECKED:
        for g in GRANULARITIES:
            keys[f"under/{fmt}/{g}"] = "sum"
            keys[f"sat/{fmt}/{g}"] = "sum"
    return keys


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("moments", _moments, {k: "sum" for k in ("count", "nonfinite", "zeros", "s1", "s2", "s3", "s4")}),
        Statistic("extremes", _extremes, {"amax": "max", "min": "min", "max": "max"}),
        Statistic("log2_hist", _log2_hist, {"log2_hist": "sum"}),
        Statistic("channel_amax", _channel_amax, {"col_amax": "max", "row_spread_max": "max"}),
        Statistic("range", _range_fractions, _range_keys()),
    )
}
MERGE_OPS_BY_KEY: dict[str, str] = {k: op for s in STATISTICS.values() for k, op in s.merge_ops.items()}
MERGE_OPS_BY_KEY["over_prev_amax"] = "sum"  # computed in OperandStats.update: it needs the history


def merge_value(a: torch.Tensor, b: torch.Tensor, op: str) -> torch.Tensor:
    if op == "sum":
        return a + b
    if op == "max":
        return torch.maximum(a, b)
    if op == "min":
        return torch.minimum(a, b)
    raise ValueError(f"unknown merge op {op!r}; use one of {MERGE_OPS}")


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """``x[..., C] -> x[R, C]``: the GEMM layout, reduction dim last."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


@dataclass
class OperandStats:
    """Merged statistics of one operand role of one site over all samples seen so far.

    ``state`` holds the mergeable sums/maxima; ``step_amax`` the amax of every sampled
    step (for the drift between samples that delayed scaling is exposed to).
    """

    role: str
    state: State = field(default_factory=dict)
    step_amax: dict[int, float] = field(default_factory=dict)

    def update(self, x: torch.Tensor, step: int) -> None:
        """Add one tensor (any shape, last dim = reduction dim) seen at ``step``."""
        x2d = as_2d(x.detach())
        new: State = {}
        for stat in STATISTICS.values():
            new.update(stat.compute(x2d, self.role))
        new["over_prev_amax"] = _f64(self._count_over_prev_amax(x2d, step))
        self.merge_state(new)
        amax = float(new["amax"])
        self.step_amax[step] = max(self.step_amax.get(step, 0.0), amax)

    def _count_over_prev_amax(self, x2d: torch.Tensor, step: int) -> int:
        """Values above the previous sampled step's amax: what delayed scaling would saturate."""
        earlier = [k for k in self.step_amax if k < step]
        if not earlier:
            return 0
        prev = self.step_amax[max(earlier)]
        return int((x2d.detach().float().abs() > prev).sum()) if prev > 0 else 0

    def merge_state(self, other: State) -> None:
        for key, value in other.items():
            if key not in self.state:
                self.state[key] = value.clone()
            elif key == "col_amax" and self.state[key].shape != value.shape:
                raise ValueError(
                    f"{self.role}: channel count changed from {self.state[key].numel()} to {value.numel()}; "
                    "a site's reduction dim must stay fixed"
                )
            else:
                self.state[key] = merge_value(self.state[key], value, MERGE_OPS_BY_KEY[key])

    def merge(self, other: "OperandStats") -> "OperandStats":
        """Fold ``other`` (another micro-batch or rank) into this one; returns self."""
        self.merge_state(other.state)
        for step, amax in other.step_amax.items():
            self.step_amax[step] = max(self.step_amax.get(step, 0.0), amax)
        return self

    @property
    def empty(self) -> bool:
        return not self.state

    def summary(self) -> dict:
        """Plain numbers for reports (see docs/probe.md for every field)."""
        return summarize(self.state, self.step_amax)


def _moment_summary(s: State) -> dict:
    n = float(s["count"]) - float(s["nonfinite"])
    if n <= 0:
        return {"mean": 0.0, "rms": 0.0, "std": 0.0, "crest_factor": 0.0, "kurtosis": 0.0}
    m1, m2, m3, m4 = (float(s[k]) / n for k in ("s1", "s2", "s3", "s4"))
    var = max(m2 - m1 * m1, 0.0)
    c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4  # 4th central moment from raw moments
    rms = math.sqrt(m2)
    amax = float(s["amax"])
    return {
        "mean": m1,
        "rms": rms,
        "std": math.sqrt(var),
        "crest_factor": amax / rms if rms > 0 else 0.0,
        "kurtosis": max(c4, 0.0) / (var * var) if var > 0 else 0.0,
    }


def _channel_summary(s: State, top: int = 8) -> dict:
    col = s["col_amax"]
    med = float(col.median()) if col.numel() else 0.0
    cmax = float(col.max()) if col.numel() else 0.0
    spread = cmax / med if med > 0 else (1.0 if cmax == 0 else math.inf)
    outliers = torch.nonzero(col > 8 * med).flatten() if med > 0 else torch.empty(0, dtype=torch.long)
    order = outliers[torch.argsort(col[outliers], descending=True)][:top]
    return {
        "col_amax_spread": spread,
        "row_amax_spread": float(s["row_spread_max"]),
        "outlier_channels": [int(i) for i in order],
        "n_outlier_channels": int(outliers.numel()),
    }


def amax_drift(step_amax: dict[int, float]) -> float:
    """Largest |log2(amax_t / amax_prev)| between consecutive sampled steps (0 with < 2 samples)."""
    values = [step_amax[k] for k in sorted(step_amax)]
    drift = 0.0
    for prev, cur in zip(values, values[1:]):
        if prev > 0 and cur > 0:
            drift = max(drift, abs(math.log2(cur / prev)))
        elif prev != cur:
            drift = math.inf
    return drift


def summarize(s: State, step_amax: dict[int, float]) -> dict:
    if not s:
        return {}
    n_range = max(float(s["range_n"]), 1.0)
    out = {
        "count": int(s["count"]),
        "nonfinite": int(s["nonfinite"]),
        "zeros": int(s["zeros"]),
        "amax": float(s["amax"]),
        "min": float(s["min"]),
        "max": float(s["max"]),
        **_moment_summary(s),
        **_channel_summary(s),
        "amax_drift_log2": amax_drift(step_amax),
        "log2_hist": {"log2_min": LOG2_MIN, "counts": [int(c) for c in s["log2_hist"]]},
        "underflow": {f: {g: float(s[f"under/{f}/{g}"]) / n_range for g in GRANULARITIES} for f in FORMATS_CHECKED},
        "saturation": {f: {g: float(s[f"sat/{f}/{g}"]) / n_range for g in GRANULARITIES} for f in FORMATS_CHECKED},
        "saturation_delayed": float(s.get("over_prev_amax", torch.zeros(()))) / n_range,
    }
    return out
