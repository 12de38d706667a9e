"""Per-site FP8 error from two probe reports: did any site's error move above its budget?

A probe report holds, per site, per recipe, per GEMM, the mean relative error of the
GEMM output with a confidence interval. The gate reads it through the probe's one
reader (``loka.probe.reader``), which checks the report's kind, version and the types
of what is read, and keys every measured error by ``"fqn/recipe/gemm"``
(``"over.0.proj/tensorwise/fprop"``); entries never measured (``n == 0``) or with a NaN
mean are skipped.

Rule (for every entry of the candidate report):

- ``pass``: the candidate's CI upper bound is within the budget;
- ``regression``: the CI is above the budget (lower bound over it) and the baseline's
  entry was within budget (or absent) — the error *moved* above its budget;
- ``inconclusive``: the CI straddles the budget while the baseline was within it;
- ``info``: over budget in the baseline already (a known unsafe recipe, not a change).

The budget is ``GateBudget.site_error`` if set, else the entry's own ``threshold``.
"""

from __future__ import annotations

import math

from loka.gate.budget import GateBudget
from loka.gate.result import INCONCLUSIVE, INFO, PASS, Check, classify_upper
from loka.probe.reader import GemmError, ReportSchemaError, report_sites


class ReportError(ValueError):
    """A probe report could not be read or holds no error entries."""


def error_entries(report: object) -> dict[str, GemmError]:
    """``{"fqn/recipe/gemm": GemmError}`` for every measured error of a probe report (path, dict or ProbeReport)."""
    try:
        sites = report_sites(report)
    except ReportSchemaError as exc:
        raise ReportError(f"probe report: {exc}") from None
    found = {f"{site.fqn}/{recipe}/{gemm}": e for site in sites for recipe, per_gemm in site.errors.items()
             for gemm, e in per_gemm.items() if e.n != 0 and not math.isnan(e.mean)}  # fmt: skip
    if not found:
        raise ReportError("the probe report holds no measured error entries (sites[*].errors with n > 0)")
    return found


def _budget_of(entry: GemmError, budget: GateBudget, path: str) -> float:
    if budget.site_error is not None:
        return budget.site_error
    if entry.threshold is None:
        raise ReportError(f"{path}: the report gives no threshold; set GateBudget.site_error / --budget-site-error")
    return entry.threshold


def site_checks(baseline_report: object, candidate_report: object, budget: GateBudget) -> tuple[list[Check], list[str]]:
    """One Check per candidate error entry, plus notes (entries only in the baseline)."""
    base = error_entries(baseline_report)
    cand = error_entries(candidate_report)
    checks: list[Check] = []
    for path in sorted(cand):
        entry = cand[path]
        bound = _budget_of(entry, budget, path)
        mean, lo, hi, n = entry.mean, entry.ci_lo, entry.ci_hi, entry.n
        verdict, needed = classify_upper(n, mean, lo, hi, bound)
        before = base.get(path)
        base_hi = before.ci_hi if before is not None else math.nan
        note = "" if before is not None else "not in baseline report"
        if verdict != PASS and before is not None and base_hi > bound:
            verdict, needed, note = INFO, None, "over budget in baseline too"
        checks.append(
            Check(
                name=f"site {path}",
                kind="site",
                baseline=before.mean if before is not None else math.nan,
                candidate=mean,
                estimate=mean,
                ci_lo=lo,
                ci_hi=hi,
                budget=f"err <= {bound:.3g}",
                verdict=verdict,
                n=n,
                n_needed=needed if verdict == INCONCLUSIVE else None,
                note=note,
            )
        )
    notes = [f"site {p} is in the baseline report but not the candidate's" for p in sorted(set(base) - set(cand))]
    return checks, notes


__all__ = ["ReportError", "error_entries", "site_checks"]
