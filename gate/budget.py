"""The gate's budget: how much quality a candidate may lose, and how sure the gate must be.

Default model-level budget: NE may rise by at most 0.02% (relative), the change Meta's
ads ranking treats as significant offline. AUC and calibration are always measured and
reported; they gate only when given a budget. Per-site FP8 error budgets come from the
probe reports' own thresholds unless ``site_error`` overrides them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_NE_BUDGET = 0.0002  # relative NE increase: 0.02%


def _check_budget(name: str, value: float | None) -> None:
    if value is None:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0 (or None to only report it)")


@dataclass(frozen=True)
class GateBudget:
    """What the candidate may lose, per task, before the gate calls it a regression.

    - ``ne_rel``: max relative NE increase (0.0002 = 0.02%).
    - ``auc_abs``: max absolute AUC drop (e.g. 0.001); None = report only.
    - ``calibration_abs``: max absolute change of calibration (sum p / sum y); None = report only.
    - ``site_error``: relative GEMM error budget for every probe-report site; None = use
      each entry's own ``threshold`` from the report.
    - ``confidence``, ``n_boot``, ``seed``: the paired bootstrap (seed fixed by default
      so CI reruns give the same verdict).
    - ``tasks``: tasks to gate (empty = every task both outputs have).
    - ``inconclusive_passes``: whether an interval that straddles a budget lets the gate
      exit 0 (default False: CI passes only what it showed to be within budget).
    """

    ne_rel: float = DEFAULT_NE_BUDGET
    auc_abs: float | None = None
    calibration_abs: float | None = None
    site_error: float | None = None
    confidence: float = 0.95
    n_boot: int = 1000
    seed: int | None = 0
    tasks: tuple[str, ...] = ()
    inconclusive_passes: bool = False

    def __post_init__(self) -> None:
        if self.ne_rel is None:
            raise ValueError("ne_rel cannot be None: NE is the gate's main metric; give a budget like 0.0002")
        for name in ("ne_rel", "auc_abs", "calibration_abs", "site_error"):
            _check_budget(name, getattr(self, name))
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"confidence={self.confidence} must be in (0.5, 1), e.g. 0.95")
        if not isinstance(self.n_boot, int) or self.n_boot < 100:
            raise ValueError(f"n_boot={self.n_boot!r} must be an int >= 100 (1000 is typical)")
        if isinstance(self.tasks, str):
            raise ValueError(f"tasks must be a tuple of task names, not one string; write ({self.tasks!r},)")
