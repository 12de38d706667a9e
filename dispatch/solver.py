"""Multiple-choice knapsack: pick at most one option per group, maximize value under a weight cap.

The plan is exactly this problem. A *group* is one GEMM of one site; its
*options* are the (kernel, recipe) pairs that pass the per-GEMM budget, each
with a *value* (milliseconds saved per step against bf16) and a *weight* (its
sensitivity-weighted error); choosing nothing means bf16 (value 0, weight 0).
The model-level budget caps the summed weight.

``solve_exact`` uses ``scipy.optimize.milp`` (binary variables, one "at most one"
row per group, one capacity row). ``solve_greedy`` is the fallback when milp is
missing or fails: options by value per unit weight, best first, each taken if
its group is still empty and it fits. Greedy can be far from optimal (a cheap
option with a high ratio can block a better one: see tests); the plan records
which solver produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    """One choice for one group: ``value`` to maximize, ``weight`` against the capacity."""

    group: object  # hashable and ordered: loka.dispatch.keys.GemmKey in plans
    key: object  # hashable and ordered: loka.dispatch.keys.ChoiceKey in plans
    value: float
    weight: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"option {self.group}/{self.key}: value and weight must be finite, weight >= 0 "
                             f"(got value={self.value}, weight={self.weight})")


@dataclass(frozen=True)
class Solution:
    """Chosen option key per group (groups absent: nothing chosen) and the solver used."""

    chosen: dict
    value: float
    weight: float
    solver: str
    note: str = ""


def _summarize(options: list[Option], picks: list[int], solver: str, note: str = "") -> Solution:
    chosen = {options[i].group: options[i].key for i in picks}
    return Solution(chosen, sum(options[i].value for i in picks), sum(options[i].weight for i in picks), solver, note)


def solve_greedy(options: list[Option], capacity: float) -> Solution:
    """Best value-per-weight first (zero weight first of all), one option per group, within capacity."""
    order = sorted(
        (i for i, o in enumerate(options) if o.value > 0),
        key=lambda i: (-(math.inf if options[i].weight == 0 else options[i].value / options[i].weight),
                       -options[i].value, options[i].group, options[i].key),
    )
    used, picks, total = set(), [], 0.0
    for i in order:
        o = options[i]
        if o.group in used or total + o.weight > capacity:
            continue
        used.add(o.group)
        picks.append(i)
        total += o.weight
    return _summarize(options, picks, "greedy")


def solve_exact(options: list[Option], capacity: float, *, time_limit_s: float = 30.0) -> Solution:
    """Optimal choice with ``scipy.optimize.milp``; raises RuntimeError if it does not solve."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # heavy: scipy, on first use

    live = [i for i, o in enumerate(options) if o.value > 0]
    if not live:
        return _summarize(options, [], "milp")
    groups = sorted({options[i].group for i in live})
    row = {g: r for r, g in enumerate(groups)}
    one_per_group = np.zeros((len(groups), len(live)))
    for col, i in enumerate(live):
        one_per_group[row[options[i].group], col] = 1.0
    weights = np.array([[options[i].weight for i in live]])
    # Scale the capacity row so tiny NE weights (1e-6) are not lost in the solver's tolerances.
    scale = 1.0 / capacity if capacity > 0 else 1.0
    constraints = [
        LinearConstraint(one_per_group, -np.inf, 1.0),
        LinearConstraint(weights * scale, -np.inf, capacity * scale * (1 + 1e-9)),
    ]
    values = np.array([options[i].value for i in live])
    res = milp(-values, constraints=constraints, integrality=np.ones(len(live)), bounds=Bounds(0, 1),
               options={"time_limit": time_limit_s})
    if res.x is None or res.status not in (0,):
        raise RuntimeError(f"milp did not solve the plan (status {res.status}: {res.message})")
    picks = [i for col, i in enumerate(live) if res.x[col] > 0.5]
    # Guard against tolerance slack: never return a selection that breaks the cap.
    if sum(options[i].weight for i in picks) > capacity * (1 + 1e-6):
        raise RuntimeError("milp returned a selection over the capacity (numerical tolerance)")
    return _summarize(options, picks, "milp")


def solve(options: list[Option], capacity: float, method: str = "auto") -> Solution:
    """``"exact"`` (milp), ``"greedy"``, or ``"auto"``: exact, greedy with a note if milp fails."""
    if method not in ("auto", "exact", "greedy"):
        raise ValueError(f"method={method!r} is not valid; use 'auto', 'exact' or 'greedy'")
    if capacity < 0:
        raise ValueError(f"capacity={capacity} must be >= 0")
    if method == "greedy":
        return solve_greedy(options, capacity)
    try:
        return solve_exact(options, capacity)
    except (ImportError, RuntimeError) as exc:
        if method == "exact":
            raise
        sol = solve_greedy(options, capacity)
        return Solution(sol.chosen, sol.value, sol.weight, "greedy", f"exact solver unavailable ({exc}); used greedy")
