"""Per-site FP8 error from two probe reports: did any site's error move above its budget?

A probe report holds, per site, per recipe, per GEMM, the mean relative error of the
GEMM output with a confidence interval. The adapter here is deliberately small: it
accepts a ``loka.probe.ProbeReport``, its JSON file, or any dict / JSON, and collects
every *error entry* — a dict with numeric ``mean``, ``ci_lo`` and ``ci_hi`` (optionally
``n`` and ``threshold``) — under the path of keys that leads to it
(``"over.0.proj/tensorwise/fprop"``). Lists of dicts are keyed by their
``fqn``/``site``/``name`` field. In a loka probe report only each site's measured
``errors`` count (not predicted errors), and entries with ``n == 0`` (never measured)
are skipped. So the gate depends on the report's layout only that little.

Rule (for every entry of the candidate report):

- ``pass``: the candidate's CI upper bound is within the budget;
- ``regression``: the CI is above the budget (lower bound over it) and the baseline's
  entry was within budget (or absent) — the error *moved* above its budget;
- ``inconclusive``: the CI straddles the budget while the baseline was within it;
- ``info``: over budget in the baseline already (a known unsafe recipe, not a change).

The budget is ``GateBudget.site_error`` if set, else the entry's own ``threshold``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from loka.gate.budget import GateBudget
from loka.gate.result import INCONCLUSIVE, INFO, PASS, Check, classify_upper

_CONTAINER_KEYS = {"sites", "errors", "gemms", "recipes", "gemm_errors"}  # layout words, not names
_NAME_FIELDS = ("fqn", "site", "name")


class ReportError(ValueError):
    """A probe report could not be read or holds no error entries."""


def load_report(report: object) -> dict[str, Any]:
    """A report as a plain dict, from a path, a dict or an object with ``to_dict()``."""
    if isinstance(report, (str, os.PathLike)):
        if not os.path.isfile(report):
            raise ReportError(f"{report}: no such probe report file")
        try:
            with open(report) as f:
                return _decode_floats(json.load(f))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{report}: not a JSON probe report ({exc})") from None
    if hasattr(report, "doc") and isinstance(report.doc, Mapping):  # loka.probe.ProbeReport
        return dict(report.doc)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, Mapping):
        return dict(report)
    raise ReportError(f"a probe report must be a path, a dict or a ProbeReport, not {type(report).__name__}")


def _decode_floats(obj: object) -> object:
    """Strict-JSON reports write non-finite floats as "inf" / "-inf" / "nan" strings."""
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def _measured_errors_only(doc: dict[str, Any]) -> object:
    """A loka probe report: only each site's measured ``errors`` (not predictions or stats)."""
    sites = doc.get("sites")
    if isinstance(sites, list) and sites and all(isinstance(s, Mapping) and "errors" in s for s in sites):
        return {str(s.get("fqn", i)): s["errors"] for i, s in enumerate(sites)}
    return doc


def _is_entry(node: object) -> bool:
    return isinstance(node, Mapping) and all(
        isinstance(node.get(k), (int, float)) and not isinstance(node.get(k), bool) for k in ("mean", "ci_lo", "ci_hi")
    )


def error_entries(report: object) -> dict[str, Mapping[str, Any]]:
    """``{path: entry}`` for every error entry in the report (see module docstring)."""
    found: dict[str, Mapping[str, Any]] = {}

    def walk(node: object, path: tuple[str, ...]) -> None:
        if _is_entry(node):
            if node.get("n", 1) != 0 and not math.isnan(node["mean"]):  # n == 0: never measured
                found["/".join(path)] = node
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, path if str(key) in _CONTAINER_KEYS else path + (str(key),))
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                name = next((child[f] for f in _NAME_FIELDS if isinstance(child, Mapping) and f in child), i)
                walk(child, path + (str(name),))

    walk(_measured_errors_only(load_report(report)), ())
    if not found:
        raise ReportError("the probe report holds no error entries (dicts with mean, ci_lo, ci_hi)")
    return found


def _budget_of(entry: Mapping[str, Any], budget: GateBudget, path: str) -> float:
    if budget.site_error is not None:
        return budget.site_error
    threshold = entry.get("threshold")
    if not isinstance(threshold, (int, float)):
        raise ReportError(f"{path}: the report gives no threshold; set GateBudget.site_error / --budget-site-error")
    return float(threshold)


def site_checks(baseline_report: object, candidate_report: object, budget: GateBudget) -> tuple[list[Check], list[str]]:
    """One Check per candidate error entry, plus notes (entries only in the baseline)."""
    base = error_entries(baseline_report)
    cand = error_entries(candidate_report)
    checks: list[Check] = []
    for path in sorted(cand):
        entry = cand[path]
        bound = _budget_of(entry, budget, path)
        mean, lo, hi = (float(entry[k]) for k in ("mean", "ci_lo", "ci_hi"))
        n = int(entry.get("n", 0) or 0)
        verdict, needed = classify_upper(n, mean, lo, hi, bound)
        before = base.get(path)
        base_hi = float(before["ci_hi"]) if before is not None else math.nan
        note = "" if before is not None else "not in baseline report"
        if verdict != PASS and before is not None and base_hi > bound:
            verdict, needed, note = INFO, None, "over budget in baseline too"
        checks.append(
            Check(
                name=f"site {path}",
                kind="site",
                baseline=float(before["mean"]) if before is not None else math.nan,
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


__all__ = ["ReportError", "error_entries", "load_report", "site_checks"]
