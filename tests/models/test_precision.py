"""Precision: parsed once from its old spellings, a plan loaded once and carried to conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from loka.dispatch import GemmChoice, Plan, PlanError, SitePlan
from loka.models.precision import Precision, apply_plan_producers, apply_precision
from loka.nn import Float8Linear
from loka.recipe import GEMMS


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def _plan() -> Plan:
    fp8 = GemmChoice("emulated", "rowwise", reason="test")
    hp = GemmChoice(reason="kept bf16: test")
    return Plan(sites=[SitePlan("0", 64, 32, 8, {g: fp8 for g in GEMMS}), SitePlan("2", 32, 16, 8, {g: hp for g in GEMMS})],
                budget={})


@pytest.mark.parametrize("spelling", ["bf16", "fp32", "fp8"])
def test_old_spellings_parse_and_print_back(spelling):
    p = Precision.parse(spelling)
    assert p.kind == spelling and p.plan is None and str(p) == spelling
    assert Precision.parse(p) is p
    assert p.is_hp == (spelling != "fp8")


def test_a_plan_path_is_loaded_once_at_parse(tmp_path):
    path = _plan().save(tmp_path / "plan.json")
    p = Precision.parse(path)  # a PathLike, as the CLI's may be
    assert p.kind == "plan" and str(p) == str(path) and p.plan.to_json() == _plan().to_json()
    assert Precision.parse(str(path)) == p
    Path(path).unlink()  # conversion and producer fusion use the loaded plan, never the file again
    model = _model()
    res = apply_precision(model, p)
    assert res.converted == ["0"] and isinstance(model[0], Float8Linear) and type(model[2]) is nn.Linear
    assert apply_plan_producers(model, p, sample=None) is None  # the plan has no norm_quant sites


def test_a_plan_in_memory_is_a_precision():
    p = Precision.parse(_plan())
    assert p.kind == "plan" and p.plan_path is None and str(p) == "plan"
    model = _model()
    assert apply_precision(model, p).converted == ["0"]


@pytest.mark.parametrize("value, message", [
    ("fp16", "precision='fp16' is not 'bf16', 'fp32', 'fp8' or a plan file path"),
    ("missing/plan.json", "plan file 'missing/plan.json' does not exist; write it with `loka plan` first"),
    (3, "precision must be 'bf16', 'fp32', 'fp8' or a plan file path, got int"),
])
def test_bad_spellings_are_one_line_errors(value, message):
    with pytest.raises(ValueError) as exc:
        Precision.parse(value)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_malformed_plan_file_is_refused_at_parse(tmp_path):
    path = tmp_path / "plan.json"
    doc = _plan().to_dict()
    doc["sites"][0]["gemms"]["fprop"]["recipe"] = "no_such_recipe"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="no_such_recipe") as exc:
        Precision.parse(path)
    assert "\n" not in str(exc.value)


def test_inconsistent_values_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        Precision("fp16")
    with pytest.raises(ValueError, match="goes with kind 'plan'"):
        Precision("plan")
    with pytest.raises(ValueError, match="goes with kind 'plan'"):
        Precision("fp8", plan_path="x.json")
