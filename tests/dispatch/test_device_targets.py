"""Per-device planning: the probe measures a target's recipes, the planner plans only those, and a
plan made for one GPU architecture is refused on another in one line (loka/devices.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from loka.devices import DEVICES, get_target, plan_target_problem, device_and_target
from loka.dispatch import apply_plan, plan
from loka.dispatch.plans import Plan, PlanError
from loka.kernels import KERNELS
from loka.recipe import RECIPE_NAMES, as_recipe

from dispatch_report_fixtures import GEMMS, report, site

EVERY_RECIPE = ("tensorwise", "rowwise", "blockwise", "mxfp8", "mxfp8_floor", "nvfp4", "tensorwise_fnuz", "rowwise_fnuz")


def big_report() -> dict:
    """Two sites large enough for FP8 to win on every GPU's speed model, every recipe within budget."""
    errs = {r: {g: 0.03 for g in GEMMS} for r in EVERY_RECIPE}
    return report(site("a", 4096, 4096, m=16384, errors=errs), site("b", 2048, 2048, m=32768, errors=errs))


def test_table_names_only_real_recipes_and_kernels():
    for caps in DEVICES:
        assert set(caps.recipes) <= set(RECIPE_NAMES)
        for name in caps.recipes:
            fmts = {as_recipe(name).operand("fprop", r).format for r in ("input", "weight")}
            assert fmts <= set(caps.formats), (caps.arch, name)
        missing = [k for k in caps.kernels if k not in KERNELS]
        assert not missing, (caps.arch, missing)
    with pytest.raises(ValueError, match="unknown device 'a100'.*b200"):
        get_target("a100")


@pytest.mark.parametrize("name, expect", [("b200", {"mxfp8", "nvfp4"}), ("mi300x", {"rowwise_fnuz"}),
                                          ("h100", {"blockwise", "rowwise", "tensorwise"})])
def test_planner_plans_only_the_targets_recipes(name, expect):
    target = get_target(name)
    p = plan(big_report(), target=name, progress=False)
    chosen = {s.gemms[g].recipe for s in p.sites for g in GEMMS if s.gemms[g].is_fp8}
    kernels = {s.gemms[g].kernel for s in p.sites for g in GEMMS if s.gemms[g].is_fp8}
    assert chosen and chosen <= set(target.caps.recipes), chosen
    assert kernels <= set(target.caps.kernels), kernels
    assert chosen & expect, chosen
    assert (p.device["target"], p.device["arch"]) == (name, target.arch)
    assert "spec, not measured" in p.device["name"] or name == "h100"  # B200/MI300X: published peaks only
    back = Plan.from_json(p.to_json())
    assert back.device["arch"] == target.arch


def test_foreign_recipes_get_a_reason():
    p = plan(report(site("a", 4096, 4096, m=16384, errors={"nvfp4": {g: 0.03 for g in GEMMS}})),
             target="mi300x", progress=False)
    assert "nvfp4 does not run on mi300x (gfx942)" in p.sites[0].gemms["fprop"].reason


def _model_for(p: Plan) -> nn.Module:
    model = nn.Module()
    for s in p.sites:
        setattr(model, s.fqn, nn.Linear(s.in_features, s.out_features))
    return model


def test_b200_plan_is_refused_on_an_h100_in_one_line():
    p = plan(big_report(), target="b200", progress=False)
    with pytest.raises(PlanError) as exc:
        apply_plan(_model_for(p), p, target="h100")
    msg = str(exc.value)
    assert "\n" not in msg and "b200 (sm100)" in msg and "h100 (sm90)" in msg and "--device h100" in msg
    # same architecture, another name: a B200 plan is a GB200 plan
    assert plan_target_problem(p.device, get_target("gb200")) is None


def test_plans_without_a_target_still_load_and_apply_anywhere():
    doc = json.loads(plan(big_report(), target="b200", progress=False).to_json())
    del doc["device"]["target"], doc["device"]["arch"]
    old = Plan.from_dict(doc)
    assert plan_target_problem(old.device, get_target("h100")) is None


def test_resolve_device():
    assert device_and_target("cpu") == (torch.device("cpu"), None)
    device, target = device_and_target("MI300X")
    assert target.arch == "gfx942" and (device.type == "cpu" or torch.cuda.is_available())


def test_plan_cli_device_b200(tmp_path, capsys):
    from loka.dispatch.cli import main

    path = tmp_path / "report.json"
    path.write_text(json.dumps(big_report()))
    assert main(["plan", "--report", str(path), "--device", "b200", "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "for b200 (sm100)" in out and "B200 (spec, not measured)" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["device"]["target"] == "b200"


def test_probe_config_for_a_device():
    from loka.probe import ProbeConfig

    cfg = ProbeConfig.for_device("b200")
    assert cfg.candidates == get_target("b200").caps.recipes and cfg.target == "b200"
    with pytest.raises(ValueError, match=r"\['blockwise'\] do not run on b200.*for_device\('b200'\)"):
        ProbeConfig(candidates=("rowwise", "blockwise"), target="b200")
