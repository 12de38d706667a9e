"""plan(objective="accuracy"): every GEMM the accuracy budget allows, fast or not (issue 29, item 18).

When the speed plan keeps everything in bf16 (small GEMMs), the accuracy objective still converts each
GEMM whose error passes the budget, with its lowest-error recipe, so FP8's quality can be checked.
"""

from __future__ import annotations

import random

import pytest

from loka.app.cli import main
from loka.dispatch import Budget, load_plan, plan

from dispatch_report_fixtures import GEMMS, report, site


def _slow_sites(rng: random.Random):
    """Sites where FP8 is slower than bf16 (the speed plan keeps them), two safe recipes of random errors."""
    out, lowest = [], {}
    for i in range(3):
        errs = {r: {g: rng.uniform(0.01, 0.07) for g in GEMMS} for r in ("rowwise", "tensorwise")}
        entries = [(g, "scaled_mm", r, rng.uniform(1.5, 3.0)) for g in GEMMS for r in errs]
        out.append(site(f"s{i}", 64, 64, errors=errs, bf16_ms=1.0, entries=entries, sensitivity={"rowwise": 1e-4}))
        lowest[f"s{i}"] = {g: min(errs, key=lambda r: errs[r][g]) for g in GEMMS}
    return out, lowest


def test_accuracy_objective_converts_what_the_speed_plan_keeps_with_the_lowest_error_recipe():
    sites, lowest = _slow_sites(random.Random())
    rep = report(*sites, site("bad", 64, 64, errors={"rowwise": {g: 0.5 for g in GEMMS}}, bf16_ms=1.0,
                              entries=[(g, "scaled_mm", "rowwise", 0.5) for g in GEMMS]))
    speed = plan(rep, Budget(max_model_ne_delta=1.0), progress=False)
    assert speed.totals()["fp8_gemms"] == 0
    acc = plan(rep, Budget(max_model_ne_delta=1.0), objective="accuracy", progress=False)
    for fqn, recipes in lowest.items():
        gemms = acc.site(fqn).gemms
        assert all(gemms[g].is_fp8 and gemms[g].recipe == recipes[g] for g in GEMMS), fqn
    assert not any(c.is_fp8 for c in acc.site("bad").gemms.values())  # over the error budget: still bf16
    assert acc.totals()["speedup"] < 1 and any("objective accuracy" in n for n in acc.notes)


def test_accuracy_objective_respects_the_model_level_budget():
    rep = report(*_slow_sites(random.Random())[0])
    every = plan(rep, Budget(max_model_ne_delta=1.0), objective="accuracy", progress=False).totals()
    assert every["fp8_gemms"] == 9
    half = plan(rep, Budget(max_model_ne_delta=every["error_cost"] / 2), objective="accuracy", progress=False)
    assert 0 < half.totals()["fp8_gemms"] < 9 and half.totals()["error_cost"] <= every["error_cost"] / 2


def test_unknown_objective_and_min_speedup_zero_name_the_objective():
    with pytest.raises(ValueError, match="objective 'fastest' is not known"):
        plan(report(site("a", 64, 64)), objective="fastest", progress=False)
    with pytest.raises(ValueError, match="--objective accuracy"):
        Budget.parse("min_speedup=0")


def test_plan_command_takes_the_objective(tmp_path, capsys):
    import json

    sites, _ = _slow_sites(random.Random())
    (tmp_path / "r.json").write_text(json.dumps(report(*sites)))
    assert main(["plan", "--report", str(tmp_path / "r.json"), "--objective", "accuracy", "--budget", "ne=1",
                 "--out", str(tmp_path / "plan")]) == 0
    assert load_plan(tmp_path / "plan" / "plan.json").totals()["fp8_gemms"] == 9
