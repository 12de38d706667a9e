"""The probe report a newcomer reads (issue 29, item 21): the bottom line first, a padding step only
where padding can pay, a reason shared by many sites spelled out once, a plot only when it carries
information, and the same "best" recipe as the FP8 model the demo trains."""

from __future__ import annotations

import copy
import random

import pytest

from loka.dispatch import plan
from loka.probe.build import _site_verdict
from loka.probe.report import ProbeReport
from probe_toy import toy_report


@pytest.fixture(scope="module")
def report():
    return toy_report()


def _copies(report, n: int, **fields) -> ProbeReport:
    """``n`` copies of the toy's ``hidden`` site (K=N=32), each with a slightly different error figure."""
    doc = copy.deepcopy(report.doc)
    base = next(s for s in doc["sites"] if s["fqn"] == "hidden")
    sites = []
    for i in range(n):
        s = copy.deepcopy(base)
        s.update(fqn=f"block{i}", **fields)
        s["reason"] = s["reason"].replace("0.", f"0.{i}", 1)  # own figures, same wording
        sites.append(s)
    doc["sites"] = sites
    return ProbeReport(doc)


def test_the_bottom_line_comes_first_and_agrees_with_the_plan(report):
    md = report.to_markdown()
    first = md.split("\n\n")[1]
    assert first.startswith("**Bottom line: ")
    fp8 = plan(report, speed_model="h100", progress=False).totals()["fp8_gemms"]
    assert ("at these shapes the plan will keep everything in bf16" in first) == (fp8 == 0), (first, fp8)
    if fp8 == 0:
        assert "plan with --objective accuracy" in first and "--objective accuracy --out runs/plan_accuracy`" in md


def test_the_bottom_line_says_when_some_site_is_safe_and_fast(report):
    rep = _copies(report, 3, verdict="safe", speed="slow", speedup=0.3, speed_source="model")
    assert "the plan will keep everything in bf16: 3 sites are accuracy-safe but none is faster" in rep.to_markdown()
    rep.doc["sites"][1].update(speed="fast", speedup=1.4)
    first = rep.to_markdown().split("\n\n")[1]
    assert "1 of 3 sites are accuracy-safe and faster than bf16" in first and "`block1` 1.40x" in first
    assert "keep everything" not in first


def test_padding_is_suggested_only_where_fp8_can_then_win(report):
    rep = _copies(report, 3, in_features=20, verdict="safe", speed="slow", speedup=0.3, speed_source="model")
    steps = rep.to_markdown().split("Next step")[1].split("\n\n")[0]
    assert "padding" not in steps  # slower than bf16 padded or not: padding them is work for nothing
    rep.doc["sites"][2].update(speed="fast", speedup=1.3)
    steps = rep.to_markdown().split("Next step")[1].split("\n\n")[0]
    assert "1 accuracy-safe site(s) not slower than bf16 have K or N not a multiple of 16" in steps


def test_a_reason_shared_by_many_sites_is_spelled_out_once(report):
    n = random.randint(4, 9)
    rep = _copies(report, n, verdict="safe", speed="slow", speedup=0.3, speed_source="model")
    md = rep.to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `block")]
    assert len(rows) == n and all(row.rstrip(" |").endswith("| R1") for row in rows), rows
    assert md.count(rep.sites[0]["reason"]) == 1 and f"**R1** ({n} sites" in md
    assert "**R1**" in rep.to_html() or "<b>R1</b>" in rep.to_html()


def test_the_error_vs_speed_plot_is_drawn_only_when_the_speedups_spread(report):
    sites = [s for s in report.sites if s.get("modeled_timings")]
    speeds = {round(s["speedup"], 2) for s in report.sites if s["speedup"] is not None}
    page = report.to_html()
    assert "No error-vs-speed plot" in page and len(speeds) == 1  # the toy: one shape class, one column
    doc = copy.deepcopy(report.doc)
    for s, scale in zip(doc["sites"], (1.0, 4.0, 9.0)):  # bf16 4x and 9x slower at two sites: a spread
        t = s["modeled_timings"]
        t["bf16_ms"] = {g: ms * scale for g, ms in t["bf16_ms"].items()}
    page = ProbeReport(doc).to_html()
    assert len(sites) >= 2 and "No error-vs-speed plot" not in page
    assert page.count("data:image/png;base64,") == 3


def _errors(ci_hi: float) -> dict:
    return {g: {"mean": ci_hi / 2, "ci_lo": 0.0, "ci_hi": ci_hi, "n": 4} for g in ("fprop", "dgrad", "wgrad")}


def _timings(ms: dict[str, float]) -> dict:
    return {"bf16_ms": {"fprop": 1.0}, "entries": [{"gemm": "fprop", "recipe": r, "median_ms": v}
                                                    for r, v in ms.items()]}


def test_best_recipe_is_the_fastest_then_the_lowest_error_bound():
    """The report named tensorwise (first in dict order) where both were 0.20x and the demo trained rowwise."""
    rng = random.Random()
    lo, hi = sorted(rng.uniform(0.01, 0.07) for _ in range(2))
    verdicts = {"tensorwise": {"verdict": "safe", "reason": "ok"}, "rowwise": {"verdict": "safe", "reason": "ok"}}
    errors = {"tensorwise": _errors(hi), "rowwise": _errors(lo)}
    tied = _timings({"tensorwise": 5.0, "rowwise": 5.0 * (1 + rng.uniform(0, 0.01))})  # 0.20x, within 2%
    assert _site_verdict(verdicts, errors, tied)[1] == "rowwise"
    faster = _timings({"tensorwise": 4.0, "rowwise": 5.0})  # 25% faster: speed decides
    assert _site_verdict(verdicts, errors, faster)[1] == "tensorwise"
    assert _site_verdict(verdicts, errors, None)[1] == "rowwise"  # untimed: the lowest error bound


def test_the_reports_best_is_the_recipe_the_demo_trains(report):
    from loka.app.demo.fp8 import safe_site_recipes

    chosen = safe_site_recipes(report, keep={})
    compared = [s for s in report.sites if s["fqn"] in chosen and s["best_recipe"] in ("tensorwise", "rowwise")]
    assert compared, "the toy has accuracy-safe sites the demo would convert"
    for s in compared:
        assert s["best_recipe"] == chosen[s["fqn"]], s["fqn"]
