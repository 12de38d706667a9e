"""Probe-report site checks: entries read through the probe's one reader, and the moved-above-budget rule."""

from __future__ import annotations

import math

import pytest

from loka.gate import GateBudget
from loka.gate.sites import ReportError, error_entries, site_checks


def _entry(mean: float, half: float = 0.005, threshold: float | None = 0.05, n: int = 5) -> dict:
    e = {"mean": mean, "ci_lo": mean - half, "ci_hi": mean + half, "n": n, "sqnr_db": 30.0, "verdict": "safe"}
    if threshold is not None:
        e["threshold"] = threshold
    return e


def _report(errors: dict) -> dict:
    """A probe-report document with ``errors`` = {fqn: {recipe: {gemm: entry}}} (the fields the gate reads)."""
    sites = [{"fqn": fqn, "in_features": 16, "out_features": 8, "errors": per} for fqn, per in errors.items()]
    return {"kind": "loka.probe.report", "schema_version": 1, "meta": {"model": "tiny"}, "sites": sites}


def test_entries_are_keyed_by_site_recipe_and_gemm():
    report = _report({"over.0": {"rowwise": {"fprop": _entry(0.01), "dgrad": _entry(0.02)}},
                      "dense.1": {"rowwise": {"fprop": _entry(0.03), "wgrad": _entry(0.03, n=0)}}})
    found = error_entries(report)
    assert set(found) == {"over.0/rowwise/fprop", "over.0/rowwise/dgrad", "dense.1/rowwise/fprop"}  # n=0 skipped
    assert found["over.0/rowwise/dgrad"].mean == 0.02 and found["over.0/rowwise/dgrad"].threshold == 0.05
    with pytest.raises(ReportError, match="no measured error entries"):
        error_entries(_report({}))


def test_moved_above_budget_is_a_regression():
    base = _report({"s": {"tensorwise": {"fprop": _entry(0.02), "wgrad": _entry(0.2)}}})
    cand = _report({"s": {"tensorwise": {"fprop": _entry(0.09), "wgrad": _entry(0.3)}}})
    checks, _ = site_checks(base, cand, GateBudget())
    by_name = {c.name: c for c in checks}
    assert by_name["site s/tensorwise/fprop"].verdict == "regression"
    # already over budget in the baseline: reported, not a change
    assert by_name["site s/tensorwise/wgrad"].verdict == "info"


def test_within_budget_straddling_and_new_entries():
    base = _report({"s": {"r": {"fprop": _entry(0.01)}}, "gone": {"r": {"fprop": _entry(0.01)}}})
    cand = _report({"s": {"r": {"fprop": _entry(0.049, half=0.01)}}, "new": {"r": {"fprop": _entry(0.2)}}})
    checks, notes = site_checks(base, cand, GateBudget())
    by_name = {c.name: c for c in checks}
    straddle = by_name["site s/r/fprop"]
    assert straddle.verdict == "inconclusive" and straddle.n_needed > straddle.n
    assert by_name["site new/r/fprop"].verdict == "regression" and "not in baseline" in by_name["site new/r/fprop"].note
    assert any("gone/r/fprop" in n for n in notes)


def test_budget_override_and_missing_threshold():
    base = _report({"s": {"r": {"fprop": _entry(0.01, threshold=None)}}})
    cand = _report({"s": {"r": {"fprop": _entry(0.04, threshold=None)}}})
    with pytest.raises(ReportError, match="no threshold"):
        site_checks(base, cand, GateBudget())
    checks, _ = site_checks(base, cand, GateBudget(site_error=0.02))
    assert checks[0].verdict == "regression"
    checks, _ = site_checks(base, cand, GateBudget(site_error=0.1))
    assert checks[0].verdict == "pass"


def test_non_finite_error_is_a_regression():
    cand = _report({"s": {"r": {"fprop": {"mean": math.inf, "ci_lo": math.inf, "ci_hi": math.inf, "n": 3,
                                          "threshold": 0.05}}}})
    checks, _ = site_checks(_report({"s": {"r": {"fprop": _entry(0.01)}}}), cand, GateBudget())
    assert checks[0].verdict == "regression"


def _probe_report(weight_00: float):
    """A real loka probe report of a 2-Linear MLP whose second layer has W[0, 0] = weight_00."""
    import torch
    from torch import nn

    from loka.probe.config import ProbeConfig, SamplingSchedule
    from loka.probe.probe import Probe

    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.SiLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[3].weight[0, 0] = weight_00
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("tensorwise",),
                      min_samples=2, max_rows=64, fit_values=64, stats=False)  # fmt: skip
    probe = Probe(model, cfg)
    for step in range(3):
        with probe.step(step):
            probe.select(model)(torch.randn(64, 16)).square().mean().backward()
    return probe.report()


def test_real_probe_reports_non_finite_site_is_caught(tmp_path):
    pytest.importorskip("loka.probe.probe")
    base, cand = _probe_report(0.1), _probe_report(float("inf"))
    # a loose budget keeps the baseline's few-sample intervals (t with 1-2 dof) within it
    budget = GateBudget(site_error=1.0)
    checks, _ = site_checks(base, cand, budget)
    by_name = {c.name: c for c in checks}
    assert by_name["site 3/tensorwise/fprop"].verdict == "regression"
    # the same through the strict JSON files the probe writes ("inf" as a string)
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, report in zip(paths, (base, cand)):
        path.write_text(report.to_json())
    checks, _ = site_checks(*paths, budget)
    assert {c.name: c.verdict for c in checks}["site 3/tensorwise/fprop"] == "regression"
    same, _ = site_checks(base, base, GateBudget())
    assert "regression" not in {c.verdict for c in same}
