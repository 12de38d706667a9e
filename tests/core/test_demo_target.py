"""``loka demo --target``: the GPU named is probed and planned for; off it, its GEMMs run emulated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loka.app.demo.fp8 import runnable_here, safe_site_recipes
from loka.app.demo.ranker import DemoConfig
from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.recipe import GEMMS


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown device 'a100'"):
        DemoConfig(target="a100")


def test_a_b200_plan_runs_emulated_on_a_cpu():
    fp4 = GemmChoice("scaled_mm_nvfp4", "nvfp4", "fast")
    site = SitePlan("s", 64, 64, 128, {"fprop": fp4, "dgrad": GemmChoice(), "wgrad": GemmChoice()})
    p = Plan(sites=[site], budget={}, device={"target": "b200", "arch": "sm100"})
    here = runnable_here(p, "cpu")
    c = here.sites[0].gemms["fprop"]
    assert (c.kernel, c.recipe) == ("emulated", "nvfp4") and "emulated here" in c.reason
    assert here.device == {"emulating": "b200"}  # runs anywhere now: apply_plan does not refuse it
    assert here.sites[0].gemms["dgrad"] == GemmChoice() and p.sites[0].gemms["fprop"].kernel == "scaled_mm_nvfp4"
    cpu_plan = Plan(sites=[SitePlan("s", 64, 64, 128, {g: GemmChoice("emulated", "rowwise") for g in GEMMS})],
                    budget={})
    assert runnable_here(cpu_plan, "cpu") is cpu_plan


def test_safe_sites_choose_among_the_targets_recipes():
    errors = {r: {g: {"ci_hi": e, "n": 3} for g in GEMMS} for r, e in (("rowwise_fnuz", 0.03), ("tensorwise_fnuz", 0.04))}
    s = {"fqn": "a", "in_features": 64, "out_features": 64, "verdict": "safe", "errors": errors,
         "recipe_verdicts": {"rowwise_fnuz": {"verdict": "safe"}, "tensorwise_fnuz": {"verdict": "safe"}}}
    report = SimpleNamespace(sites=[s])
    assert safe_site_recipes(report, {}, "mi300x") == {"a": "rowwise_fnuz"}
    assert safe_site_recipes(report, {}) == {}  # the H100 defaults (tensorwise/rowwise) were not measured
