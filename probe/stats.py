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

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from loka.formats import get_format
from loka.quantize import group_shape, group_amax, scale_from_amax
from loka.recipe import GRANULARITIES, Recipe

# log2-magnitude histogram: bin i counts nonzero finite values with floor(log2|x|) == LOG2_MIN + i,
# clamped at both ends; exact zeros are counted separately.
LOG2_MIN, LOG2_MAX = -48, 24
N_LOG2_BINS = LOG2_MAX - LOG2_MIN + 1
FORMATS_CHECKED = ("e4m3", "e5m2")
MERGE_OPS = ("sum", "max", "min")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Prepared:
    """One 2-D tensor in the forms every statistic needs, computed once: ``x`` float32,
    ``ax`` = |x| with non-finite values set to 0, and the ``finite`` mask (None when
    ``all_finite``: the common case skips the mask and the copies it would cost)."""

    x: torch.Tensor
    finite: torch.Tensor | None
    ax: torch.Tensor
    all_finite: bool

    @classmethod
    def of(cls, x2d: torch.Tensor) -> "Prepared":
        x = x2d.detach().float()
        ax = x.abs()
        if x.numel() and bool(torch.isfinite(ax.amax())):  # amax is NaN/Inf exactly when a value is
            return cls(x, None, ax, True)
        finite = torch.isfinite(x)
        return cls(x, finite, torch.where(finite, ax, torch.zeros((), device=x.device)), not x.numel())

    def finite_values(self) -> torch.Tensor:
        """The finite values of ``x``, flattened."""
        return self.x.flatten() if self.all_finite else self.x[self.finite]

    @functools.cached_property
    def rows(self) -> torch.Tensor | None:
        """At most :data:`STATS_ROWS` evenly strided row indices (None: every row)."""
        return strided_rows(self.x.shape[0], STATS_ROWS, self.x.device)

    def sample_rows(self) -> torch.Tensor:
        """The indices of the sampled rows in ``x`` (``arange`` when every row is kept)."""
        return torch.arange(self.x.shape[0], device=self.x.device) if self.rows is None else self.rows

    @functools.cached_property
    def sample(self) -> "Prepared":
        """The same forms on :attr:`rows` (the value-level statistics' sample)."""
        if self.rows is None:
            return self
        r = self.rows
        return Prepared(self.x[r], None if self.finite is None else self.finite[r], self.ax[r], self.all_finite)


# Value-level statistics (moments, histogram, underflow) are computed on at most this many
# evenly strided rows of a captured operand: the captured rows are already a sample of the
# batch, and a few hundred rows pin these numbers down at a fraction of the cost. Count,
# non-finite count, amax, min/max and per-channel amax use every captured row.
STATS_ROWS = 256


def strided_rows(n: int, cap: int, device=None) -> torch.Tensor | None:
    """``cap`` or fewer row indices spread evenly over ``n`` rows, or None when ``n <= cap``."""
    return None if n <= cap else torch.arange(0, n, -(-n // cap), device=device)


@dataclass(frozen=True)
class Statistic:
    """One statistic: ``compute(prepared, role) -> state`` and the merge op of every state key."""

    name: str
    compute: Callable[[Prepared, str], State]
    merge_ops: dict[str, str]


def _f64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).cpu()


def _moments(p: Prepared, role: str) -> State:
    xd = p.sample.finite_values().double()
    x2 = xd * xd
    nonfinite = 0 if p.all_finite else int((~p.finite).sum())
    return {
        "count": _f64(p.x.numel()),
        "nonfinite": _f64(nonfinite),
        "n": _f64(xd.numel()),
        "zeros": _f64(int((xd == 0).sum())),
        "s1": xd.sum().cpu(),
        "s2": x2.sum().cpu(),
        "s3": (x2 * xd).sum().cpu(),
        "s4": (x2 * x2).sum().cpu(),
    }


def _extremes(p: Prepared, role: str) -> State:
    if not p.x.numel() or (not p.all_finite and not bool(p.finite.any())):
        return {"amax": _f64(0.0), "min": _f64(math.inf), "max": _f64(-math.inf)}
    if p.all_finite:
        lo, hi = p.x.min(), p.x.max()
    else:
        big = torch.tensor(math.inf, device=p.x.device)
        lo = torch.where(p.finite, p.x, big).min()
        hi = torch.where(p.finite, p.x, -big).max()
    return {"amax": _f64(p.ax.max().item()), "min": _f64(lo.item()), "max": _f64(hi.item())}


def _log2_hist(p: Prepared, role: str) -> State:
    ax = p.sample.ax
    nz = ax[ax > 0]
    _, exp = torch.frexp(nz)  # |x| = m * 2**exp, m in [0.5, 1) -> floor(log2|x|) = exp - 1
    idx = (exp - 1).clamp(LOG2_MIN, LOG2_MAX) - LOG2_MIN
    return {"log2_hist": torch.bincount(idx.long(), minlength=N_LOG2_BINS).double().cpu()}


def _channel_amax(p: Prepared, role: str) -> State:
    """Per-column amax (channels along the reduction dim) and the worst row's amax spread."""
    ax = p.ax
    if ax.numel() == 0:
        return {"col_amax": torch.zeros(ax.shape[-1], dtype=torch.float64), "row_spread_max": _f64(1.0)}
    row = ax.amax(dim=1)
    med, top = row.median().item(), row.max().item()
    spread = top / med if med > 0 else (1.0 if top == 0 else math.inf)
    return {"col_amax": ax.amax(dim=0).double().cpu(), "row_spread_max": _f64(spread)}


@functools.lru_cache(maxsize=None)
def _check_operand(role: str, granularity: str, fmt: str):
    """The operand recipe a named recipe uses for ``role``, in ``fmt`` (for underflow/saturation)."""
    recipe = Recipe.from_name(granularity)
    op = recipe.fprop.a if role == "input" else recipe.fprop.b if role == "weight" else recipe.dgrad.a
    return replace(op, format=fmt)


def _count_below(ax: torch.Tensor, pos: torch.Tensor, bound: torch.Tensor, group) -> int:
    """Count of positive ``ax`` below its group's ``bound`` (``[]``, ``[R, 1]`` or ``[R, Cg]``),
    compared block by block in place instead of broadcasting the bound to ``ax``'s shape."""
    if bound.dim() == 0 or bound.shape[-1] == 1:
        return int(((ax < bound) & pos).sum())
    r, c = ax.shape
    bc = group[1]
    pc = (-c) % bc
    ax_b = torch.nn.functional.pad(ax, (0, pc)).view(r, -1, bc)
    pos_b = torch.nn.functional.pad(pos, (0, pc)).view(r, -1, bc)
    return int(((ax_b < bound.unsqueeze(-1)) & pos_b).sum())


def _range_fractions(p: Prepared, role: str) -> State:
    """Counts of nonzero finite values that would underflow to zero, per format and granularity.

    The same rule as ``loka.quantize.fraction_underflow_saturate`` (dynamic scale from the
    group's finite amax; a value underflows when ``|x| / scale`` is below half the smallest
    subnormal), computed once per granularity for both formats, on the sampled rows
    (:data:`STATS_ROWS`) with each group's scale from the whole operand. Under dynamic
    scaling nothing saturates (the scale is chosen so amax maps to fmax); saturation is what
    *delayed* scaling risks, measured by ``saturation_delayed`` against the previous sample's
    amax (see :meth:`OperandStats.update`).
    """
    ax, sub = p.ax, p.sample.ax
    pos = sub > 0
    out: State = {"range_n": _f64(int(pos.sum()))}
    for g in GRANULARITIES:
        op = _check_operand(role, g, "e4m3")
        group = group_shape(ax.shape, g, op.block)
        if group is not None and group[0] > 1:
            # 2-D blocks span several rows: take each block's amax over the whole operand and
            # give every sampled row (all rows when none are dropped) the amax of its block, so
            # the bound is always one entry per sampled row and column block.
            rows = p.sample_rows()
            amax = group_amax(ax, g, op.block, finite_only=False)[rows // group[0]]
            group = (1, group[1])
        else:  # one group per tensor (whole operand) or groups within a row (sampled rows only)
            amax = group_amax(ax if group is None else sub, g, op.block, finite_only=False)
        for fmt in FORMATS_CHECKED:
            f = get_format(fmt)
            bound = scale_from_amax(amax, f, op.pow2) * (f.min_subnormal / 2)
            out[f"under/{fmt}/{g}"] = _f64(_count_below(sub, pos, bound, group))
    return out


def _range_keys() -> dict[str, str]:
    keys = {"range_n": "sum"}
    for fmt in FORMATS_CHECKED:
        for g in GRANULARITIES:
            keys[f"under/{fmt}/{g}"] = "sum"
    return keys


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("moments", _moments, {k: "sum" for k in ("count", "nonfinite", "n", "zeros", "s1", "s2", "s3", "s4")}),
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

    def update(self, x: torch.Tensor, step: int, full: torch.Tensor | None = None) -> None:
        """Add one tensor (any shape, last dim = reduction dim) seen at ``step``.

        ``full``: ``[numel, nonfinite, finite amax]`` of the whole tensor when ``x`` holds only
        sampled rows of it (see loka.probe.capture); count, non-finite count and amax are then
        exact while the other statistics describe the sampled rows.
        """
        prep = Prepared.of(as_2d(x.detach()))
        new: State = {}
        for stat in STATISTICS.values():
            new.update(stat.compute(prep, self.role))
        if full is not None:
            full = full.double().cpu()
            new["count"], new["nonfinite"] = full[0].clone(), full[1].clone()
            new["amax"] = torch.maximum(new["amax"], full[2])
        new["over_prev_amax"] = _f64(self._count_over_prev_amax(prep, step))
        self.merge_state(new)
        amax = float(new["amax"])
        self.step_amax[step] = max(self.step_amax.get(step, 0.0), amax)

    def _count_over_prev_amax(self, p: Prepared, step: int) -> int:
        """Values above the previous sampled step's amax: what delayed scaling would saturate."""
        earlier = [k for k in self.step_amax if k < step]
        if not earlier:
            return 0
        prev = self.step_amax[max(earlier)]
        return int((p.ax > prev).sum()) if prev > 0 else 0

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
    n = float(s["n"])  # finite values behind the power sums (sampled rows)
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
        "sampled_values": int(s["n"]),
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
        "saturation_delayed": float(s.get("over_prev_amax", torch.zeros(()))) / n_range,
    }
    return out
