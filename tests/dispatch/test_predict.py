"""The plan's predicted step speed-up (Amdahl on its GEMM saving) against a hand computation."""

from __future__ import annotations

import random

import pytest

from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.dispatch.predict import predicted_step, prediction_error


def _plan(per_site: list[tuple[float, float | None]]) -> Plan:
    """One site per (bf16_ms, planned_ms or None for bf16) with that time on all three GEMMs."""
    sites = []
    for i, (bf16, planned) in enumerate(per_site):
        gemms = {}
        for g in ("fprop", "dgrad", "wgrad"):
            if planned is None:
                gemms[g] = GemmChoice(reason="kept bf16: test", bf16_ms=bf16)
            else:
                gemms[g] = GemmChoice("scaled_mm", "rowwise", "test", 0.01, 30.0, bf16, planned, 0.0)
        sites.append(SitePlan(f"s{i}", 64, 64, 256, gemms, None))
    return Plan(sites=sites, budget={})


def test_amdahl_by_hand():
    per_site = [(random.uniform(0.1, 1.0), None if random.random() < 0.3 else random.uniform(0.05, 0.1))
                for _ in range(6)]
    step = 10.0 + random.uniform(0, 5)
    saved = sum(3 * (b - p) for b, p in per_site if p is not None)
    out = predicted_step(_plan(per_site), step)
    assert out["saved_ms"] == pytest.approx(saved)
    assert out["planned_step_ms"] == pytest.approx(step - saved)
    assert out["speedup"] == pytest.approx(step / (step - saved))


def test_all_bf16_plan_predicts_no_change():
    assert predicted_step(_plan([(0.5, None)]), 3.0)["speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "5"])
def test_bad_step_time(bad):
    with pytest.raises(ValueError, match="bf16_step_ms"):
        predicted_step(_plan([(0.5, None)]), bad)


def test_saving_larger_than_the_step_names_the_cause():
    with pytest.raises(ValueError, match="another device"):
        predicted_step(_plan([(2.0, 0.1)]), 1.0)


def test_prediction_error():
    assert prediction_error(1.15, 1.0) == pytest.approx(0.15)
    assert prediction_error(0.85, 1.0) == pytest.approx(-0.15)
    with pytest.raises(ValueError):
        prediction_error(1.0, 0.0)
