"""plan(report, budget): choices, reasons, budgets, and the plan JSON."""

from __future__ import annotations

import json

import pytest

from loka.dispatch import Budget, Plan, PlanError, load_plan, plan

from dispatch_report_fixtures import GEMMS, report, site

FAST = [(g, "scaled_mm", "rowwise", 0.5) for g in GEMMS] + [(g, "torchao", "rowwise", 0.6) for g in GEMMS]


def test_fastest_kernel_within_budget_is_chosen_per_gemm():
    rep = report(site("a", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-5}))
    p = plan(rep, Budget(), progress=False)
    s = p.site("a")
    assert all(s.gemms[g].kernel == "scaled_mm" and s.gemms[g].recipe == "rowwise" for g in GEMMS)
    assert s.expected_speedup() == pytest.approx(2.0)
    assert "2.00x vs bf16" in s.gemms["fprop"].reason
    assert p.totals()["speedup"] == pytest.approx(2.0)


def test_kept_bf16_reasons_error_and_speed():
    slow = [(g, "scaled_mm", "rowwise", 2.0) for g in GEMMS]
    rep = report(
        site("err", 256, 512, errors={"rowwise": {"fprop": 0.03, "dgrad": 0.03, "wgrad": 0.09}}, bf16_ms=1.0,
             entries=FAST),
        site("slow", 64, 64, bf16_ms=1.0, entries=slow),
        site("untimed", 256, 256),
    )
    p = plan(rep, Budget(max_rel_error={"fprop": 0.05, "dgrad": 0.05, "wgrad": 0.05}), progress=False)
    err = p.site("err").gemms
    assert err["fprop"].is_fp8 and not err["wgrad"].is_fp8
    assert err["wgrad"].reason == "kept bf16: wgrad rel. error 9.0e-02 > budget 5.0e-02 (rowwise)"
    assert p.site("slow").gemms["fprop"].reason.startswith("kept bf16: K=64, no FP8 kernel faster than bf16")
    assert "no timing" in p.site("untimed").gemms["fprop"].reason
    assert any("no timings" in n for n in p.notes)


def test_model_level_budget_chooses_most_time_per_error():
    # Each site saves 0.5 ms per GEMM; "sensitive" costs 100x more of the NE budget.
    rep = report(
        site("robust", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-4}),
        site("sensitive", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-2}),
    )
    # cost per GEMM = coef * ci_hi = (rel_loss_delta / mean) * ci_hi = 1.25 * rel_loss_delta
    p = plan(rep, Budget(max_model_ne_delta=4e-4), progress=False)
    assert all(p.site("robust").gemms[g].is_fp8 for g in GEMMS)
    assert not p.site("sensitive").is_fp8
    assert "model-level NE budget" in p.site("sensitive").gemms["fprop"].reason
    assert p.totals()["error_cost"] <= 4e-4


def test_unavailable_or_unsupporting_kernels_are_not_planned():
    entries = [(g, "te", "rowwise", 0.1) for g in GEMMS] + [(g, "scaled_mm", "rowwise", 0.1) for g in GEMMS]
    rep = report(site("odd", 40, 24, bf16_ms=1.0, entries=entries))  # K=40: not a multiple of 16
    p = plan(rep, progress=False)
    reason = p.site("odd").gemms["fprop"].reason
    assert not p.site("odd").gemms["fprop"].is_fp8
    assert "te: not installed" in reason or "K=40" in reason


def test_plan_json_round_trip_stable_and_diffable(tmp_path):
    rep = report(site("b.proj", 256, 512, bf16_ms=1.0, entries=FAST), site("a.proj", 128, 128, bf16_ms=0.2, entries=FAST))
    p = plan(rep, progress=False)
    path = p.save(tmp_path / "plan.json")
    text = path.read_text()
    assert text.index('"fqn": "a.proj"') < text.index('"fqn": "b.proj"')
    doc = json.loads(text)
    assert doc["kind"] == "loka.dispatch.plan" and doc["schema_version"] == 1
    assert list(doc) == sorted(doc)
    assert {"torch", "torchao", "triton", "transformer_engine"} <= set(doc["versions"])
    assert doc["budget"]["max_model_ne_delta"] == pytest.approx(2e-4)
    q = load_plan(path)
    assert q.to_json() == p.to_json()
    assert "| a.proj |" in q.summary()


def test_load_plan_lists_every_problem(tmp_path):
    doc = json.loads(plan(report(site("a", 256, 512, bf16_ms=1.0, entries=FAST)), progress=False).to_json())
    doc["sites"][0]["in_features"] = "256"
    del doc["sites"][0]["gemms"]["wgrad"]
    doc["sites"][0]["gemms"]["fprop"]["recipe"] = "nonsense"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(PlanError) as exc:
        load_plan(bad)
    msg = str(exc.value)
    assert "in_features" in msg and "missing 'wgrad'" in msg and "nonsense" in msg
    (tmp_path / "v.json").write_text(json.dumps({**doc, "schema_version": 99}))
    with pytest.raises(PlanError, match="schema_version"):
        load_plan(tmp_path / "v.json")
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


def test_budget_validation_and_parse():
    with pytest.raises(ValueError, match="unknown gemms"):
        Budget(max_rel_error={"fprop": 0.1, "dgrad": 0.1, "wgrad": 0.1, "xgrad": 0.1})
    with pytest.raises(ValueError, match="max_model_ne_delta"):
        Budget(max_model_ne_delta=0)
    b = Budget.parse("wgrad=0.05,ne=1e-4,sqnr_fprop=25")
    assert b.max_rel_error["wgrad"] == 0.05 and b.max_model_ne_delta == 1e-4 and b.min_sqnr_db == {"fprop": 25.0}
    assert b.gemm_check("fprop", 0.01, 20.0) == "fprop SQNR 20.0 dB < budget 25.0 dB"
    with pytest.raises(ValueError, match="unknown"):
        Budget.parse("bogus=1")
    assert Budget.from_dict(b.to_dict()) == b


def test_budget_from_json_file(tmp_path):
    b = Budget.parse("fprop=0.05,ne=3e-4")
    (tmp_path / "budget.json").write_text(json.dumps(b.to_dict()))
    assert Budget.parse(str(tmp_path / "budget.json")) == b
    with pytest.raises(ValueError, match="does not exist"):
        Budget.parse(str(tmp_path / "missing.json"))


def test_greedy_method_is_recorded():
    rep = report(site("a", 256, 512, bf16_ms=1.0, entries=FAST))
    assert plan(rep, method="greedy", progress=False).solver == "greedy"
    assert isinstance(plan(rep, progress=False), Plan)


def test_no_kernel_for_the_shape_says_why():
    rep = report(site("tiny", 13, 4, bf16_ms=1.0, entries=[]))
    reason = plan(rep, progress=False).site("tiny").gemms["fprop"].reason
    assert reason.startswith("kept bf16: no FP8 kernel available here takes rowwise at [M=256, K=13, N=4]")
    assert "N=4 is not a multiple of 16" in reason


def test_plan_measures_sites_without_timings(tmp_path):
    import torch

    rep = report(site("enc", 32, 16, m=16), site("odd", 13, 4, m=16))
    kw = dict(measure=True, kernels=["scaled_mm"], dtype=torch.float32, cache_dir=tmp_path, progress=False,
              bench={"warmup": 0, "iters": 2})
    p = plan(rep, **kw)
    enc = p.site("enc").gemms["fprop"]
    assert enc.bf16_ms is not None and enc.bf16_ms > 0
    assert "no timing" not in enc.reason
    assert "K=13 is not a multiple of 16" in p.site("odd").gemms["fprop"].reason
    assert any("not representative" in n for n in p.notes)
    assert list(tmp_path.iterdir()), "micro-benchmarks were not cached"


def test_emulated_is_never_planned():
    entries = [(g, "emulated", "rowwise", 0.01) for g in GEMMS] + [(g, "scaled_mm", "rowwise", 0.9) for g in GEMMS]
    p = plan(report(site("a", 256, 512, bf16_ms=1.0, entries=entries)), progress=False)
    assert all(p.site("a").gemms[g].kernel == "scaled_mm" for g in GEMMS)


def test_serving_plan_times_fprop_at_declared_batch_sizes(tmp_path):
    import torch

    rep = report(site("enc", 32, 16, m=4096, sensitivity={"rowwise": 1e-6}))
    p = plan(rep, m_buckets=[8, 32], kernels=["scaled_mm"], dtype=torch.float32, cache_dir=tmp_path,
             progress=False, bench={"warmup": 0, "iters": 2})
    s = p.site("enc")
    assert s.m == 32
    assert s.gemms["dgrad"].reason == "kept bf16: serving plan, dgrad does not run"
    assert s.gemms["fprop"].bf16_ms is not None
    assert any("serving plan" in n for n in p.notes)
    assert s.expected_speedup() is not None and p.totals()["speedup"] is not None
