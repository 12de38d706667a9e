"""A Recipe built field by field is probed, planned, written, read back and applied.

Recipes used to travel as names, so a hand-built one could be probed but never planned
("not a named loka recipe"). Now the report and the plan record its fields
(loka.recipe_json) and the planner carries Recipe objects and typed GEMM keys.

The CPU timings the probe takes are real but not representative, so the plan is made
from *hypothetical* timings (every FP8 GEMM at half its bf16 time): a stand-in for a GPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import loka
from loka.dispatch import Budget, GemmChoice, Plan, PlanError, SitePlan, load_plan, plan
from loka.dispatch.keys import ChoiceKey, GemmKey
from loka.nn import Float8Linear
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.recipe import GEMMS, GemmRecipe, OperandRecipe, Recipe
from loka.recipe_json import needs_fields, recipe_from_dict, recipe_to_dict

NAME = "tensorwise_pow2_by_hand"


def _hand_built() -> Recipe:
    """Power-of-two tensorwise scales, e5m2 gradients: no named recipe has these fields."""
    e4m3 = OperandRecipe(format="e4m3", granularity="tensorwise", pow2_scale=True)
    e5m2 = OperandRecipe(format="e5m2", granularity="tensorwise", pow2_scale=True)
    return Recipe(name=NAME, fprop=GemmRecipe(e4m3, e4m3), dgrad=GemmRecipe(e5m2, e4m3),
                  wgrad=GemmRecipe(e5m2, e4m3))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def _loss(model, step: int) -> torch.Tensor:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(100 + step))
    return model(x).square().mean()


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = _model()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=(_hand_built(),),
                                     stop_when_decided=False, fit_values=128))
    for step in range(3):
        with probe.step(step):
            _loss(model, step).backward()
    probe.time_sites(kernels=["scaled_mm"], warmup=0, iters=2)
    return probe.report(model="toy")


def _twice_as_fast(report) -> dict:
    out = {}
    for s in report.doc["sites"]:
        t = copy.deepcopy(s["timings"])
        for e in t["entries"]:
            e["median_ms"] = t["bf16_ms"][e["gemm"]] / 2
        out[s["fqn"]] = t
    return out


def _plan(report, source=None) -> Plan:
    """The plan of ``source`` (default: ``report``; or its saved file) with the hypothetical timings."""
    return plan(report if source is None else source, Budget(max_rel_error={g: 1.0 for g in GEMMS}, max_model_ne_delta=1.0),
                timings=_twice_as_fast(report), kernels=["scaled_mm"], progress=False)


def test_report_records_the_hand_built_fields(report, tmp_path):
    assert report.doc["recipes"] == {NAME: json.loads(json.dumps(recipe_to_dict(_hand_built())))}
    assert all(NAME in s["errors"] for s in report.doc["sites"])
    # the saved report plans the same as the one in memory
    path = report.save(tmp_path / "report")["json"]
    assert _plan(report, path).to_dict()["sites"] == _plan(report).to_dict()["sites"]


def test_hand_built_recipe_is_planned_and_applied(report):
    p = _plan(report)
    chosen = [(s.fqn, g, s.gemms[g]) for s in p.sites for g in GEMMS if s.gemms[g].is_fp8]
    assert {(f, g) for f, g, _ in chosen} == {(f, g) for f in ("0", "2") for g in GEMMS}, p.summary()
    assert all(c.recipe == NAME and c.spec == _hand_built() for _, _, c in chosen)

    model = _model()
    res = loka.convert(model, plan=p)
    assert res.converted == ["0", "2"]
    for fqn in ("0", "2"):
        lin = model.get_submodule(fqn)
        assert isinstance(lin, Float8Linear)
        assert all(lin.recipe.gemm(g) == _hand_built().gemm(g) for g in GEMMS)
    loss = _loss(model, 7)
    loss.backward()
    assert torch.isfinite(loss) and model[0].weight.grad is not None


def test_plan_json_round_trips_the_recipe_fields(report, tmp_path):
    p = _plan(report)
    doc = json.loads(p.to_json())
    assert recipe_from_dict(doc["recipes"][NAME]) == _hand_built()
    back = load_plan(p.save(tmp_path / "plan.json"))
    assert back.to_json() == p.to_json()
    assert back.site("0").gemms["fprop"] == p.site("0").gemms["fprop"]
    assert back.site("0").gemms["fprop"].spec == _hand_built()
    assert back.site("2").recipe().fprop == _hand_built().fprop


def test_named_recipes_write_no_recipes_entry():
    fp8 = GemmChoice("scaled_mm", "rowwise", reason="test")
    p = Plan(sites=[SitePlan("0", 64, 32, 16, {g: fp8 for g in GEMMS})], budget={})
    assert "recipes" not in p.to_dict()
    back = Plan.from_json(p.to_json()).site("0").gemms["fprop"]
    assert back == fp8 and back.recipe_object() == Recipe.from_name("rowwise")
    with pytest.raises(PlanError, match="leave spec None for a named recipe"):
        GemmChoice("scaled_mm", "rowwise", spec=Recipe.from_name("rowwise"))
    with pytest.raises(PlanError, match="does not say"):
        GemmChoice("scaled_mm", "other", spec=_hand_built())


def test_a_named_recipe_with_overrides_records_its_fields():
    r = Recipe.from_name("rowwise", pow2_scale=True)  # named "rowwise" but not rowwise
    assert needs_fields(r) and not needs_fields(Recipe.from_name("rowwise"))
    fp8 = GemmChoice("scaled_mm", r.name, reason="test", spec=r)
    p = Plan(sites=[SitePlan("0", 64, 32, 16, {g: fp8 for g in GEMMS})], budget={})
    assert Plan.from_json(p.to_json()).site("0").gemms["dgrad"].spec == r


def _doc_with(recipes=None, recipe=NAME) -> dict:
    fp8 = GemmChoice("scaled_mm", recipe, reason="test", spec=_hand_built() if recipe == NAME else None)
    doc = Plan(sites=[SitePlan("0", 64, 32, 16, {g: fp8 for g in GEMMS})], budget={}).to_dict()
    if recipes is not None:
        doc["recipes"] = recipes
    return doc


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("recipes"), "recipe 'tensorwise_pow2_by_hand' is neither a named loka recipe nor defined"),
    (lambda d: d["recipes"][NAME]["fprop"]["a"].update(format="e9m9"), "recipes.tensorwise_pow2_by_hand: fprop.a: format='e9m9'"),
    (lambda d: d["recipes"][NAME]["fprop"]["a"].update(colour="red"), "unknown operand fields ['colour']"),
    (lambda d: d["recipes"][NAME]["wgrad"].pop("b"), "wgrad: a GEMM recipe is an object with the keys 'a' and 'b'"),
    (lambda d: d["recipes"][NAME].update(name="other"), "the key must be the recipe's name"),
    (lambda d: d.update(recipes=[1]), "recipes: expected an object"),
])
def test_malformed_recipe_fields_are_refused_in_one_line(edit, message):
    doc = json.loads(json.dumps(_doc_with()))
    edit(doc)
    with pytest.raises(PlanError) as exc:
        Plan.from_dict(doc)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_two_recipes_under_one_name_are_refused():
    other = Recipe.from_name("tensorwise").with_gemm("fprop", Recipe.from_name("tensorwise").fprop, name=NAME)
    sites = [SitePlan("0", 64, 32, 16, {g: GemmChoice("scaled_mm", NAME, spec=_hand_built()) for g in GEMMS}),
             SitePlan("1", 64, 32, 16, {g: GemmChoice("scaled_mm", NAME, spec=other) for g in GEMMS})]
    with pytest.raises(PlanError, match="two different recipes are both named"):
        Plan(sites=sites, budget={})


def test_keys_are_typed_and_ordered():
    assert sorted([GemmKey("b", "fprop"), GemmKey("a|x", "wgrad"), GemmKey("a|x", "dgrad")]) == [
        GemmKey("a|x", "dgrad"), GemmKey("a|x", "wgrad"), GemmKey("b", "fprop")]
    assert str(ChoiceKey("scaled_mm", NAME)) == f"scaled_mm/{NAME}"
    with pytest.raises(ValueError, match="is not a GEMM"):
        GemmKey("a", "bprop")


def test_a_target_runs_a_hand_built_recipe_by_its_fields():
    from loka.devices import get_target

    h100, mi300 = get_target("h100").caps, get_target("mi300x").caps
    assert h100.runs_recipe(_hand_built())  # e4m3/e5m2 tensorwise: Hopper's table
    assert not mi300.runs_recipe(_hand_built())  # MI300 runs the fnuz encodings only
    nvfp4_by_hand = Recipe.from_name("nvfp4").with_gemm("wgrad", Recipe.from_name("nvfp4").wgrad, name="my_fp4")
    assert not h100.runs_recipe(nvfp4_by_hand) and get_target("b200").caps.runs_recipe(nvfp4_by_hand)
    assert h100.runs_recipe(Recipe.from_name("rowwise")) and not mi300.runs_recipe(Recipe.from_name("rowwise"))


def test_hand_built_recipe_is_planned_for_a_remote_target_by_its_speed_model(report):
    p = plan(report, Budget(max_rel_error={g: 1.0 for g in GEMMS}, max_model_ne_delta=1.0), target="h100",
             progress=False)
    assert p.device["target"] == "h100"
    reasons = [s.gemms[g].reason for s in p.sites for g in GEMMS]
    assert not any("not a named loka recipe" in r or "does not run on" in r for r in reasons), reasons
    # the H100 speed model priced the hand-built recipe (too slow at these tiny shapes, said so)
    assert all(s.gemms[g].is_fp8 or f"scaled_mm/{NAME}" in s.gemms[g].reason for s in p.sites for g in GEMMS), reasons


def test_timing_cache_tells_a_hand_built_recipe_from_its_namesake(tmp_path):
    from loka.dispatch.microbench import open_cache
    from loka.probe.timing import time_site

    def run(recipe):
        cache = open_cache(tmp_path, "cpu")
        t = time_site((32, 64, 32), [recipe], kernels=["scaled_mm"], gemms=("fprop",), dtype=torch.float32, warmup=0,
                      iters=1, cache=cache, progress=False)
        cache.save()
        return [(e.recipe, e.cached) for e in t.entries]

    assert run("tensorwise") == [("tensorwise", False)]
    assert run(Recipe.from_name("tensorwise")) == [("tensorwise", True)]
    assert run(Recipe.from_name("tensorwise", pow2_scale=True)) == [("tensorwise", False)]


def test_report_recipe_fields_are_checked_in_one_line(report):
    from loka.probe.schema import ReportSchemaError

    doc = copy.deepcopy(report.doc)
    doc["recipes"][NAME]["fprop"]["a"]["format"] = "e9m9"
    with pytest.raises(ReportSchemaError) as exc:
        _plan(report, doc)
    assert f"recipes.{NAME}: fprop.a: format='e9m9'" in str(exc.value) and "\n" not in str(exc.value)
    doc["recipes"] = [1]
    with pytest.raises(ReportSchemaError, match="recipes: expected an object"):
        _plan(report, doc)


def test_a_report_without_the_fields_keeps_bf16_and_says_why(report):
    doc = copy.deepcopy(report.doc)
    del doc["recipes"]  # as a report written before loka recorded hand-built recipes
    p = _plan(report, doc)
    assert not any(s.is_fp8 for s in p.sites)
    assert all("not a named loka recipe and the report does not record its fields" in s.gemms[g].reason
               for s in p.sites for g in GEMMS)
