"""Malformed plan and probe-report files: one line naming the problem and exit 2, never a traceback.

Issue 19 item 7: wrong types (``"sites": 5``, an errors field that is a string), a
top-level list and 100k-deep nesting ended in tracebacks (in ``loka gate`` with exit 1,
which CI reads as a regression), and a report with an unknown ``kind`` or
``schema_version`` 99 was accepted. The gate's side of the same inputs is in
tests/gate/test_cli.py.
"""

from __future__ import annotations

import json

import pytest
from torch import nn

import loka
from loka.app.cli import main
from loka.dispatch import PlanError, load_plan, plan
from loka.probe.reader import ReportSchemaError, report_sites

from dispatch_report_fixtures import GEMMS, report, site

DEEP = "[" * 100_000 + "]" * 100_000


def _good_plan_doc() -> dict:
    entries = [(g, "emulated", "rowwise", 0.5) for g in GEMMS]
    return json.loads(plan(report(site("0", 32, 16, bf16_ms=1.0, entries=entries)), progress=False).to_json())


def _plan_cases() -> dict[str, tuple[str, str]]:
    good = _good_plan_doc()
    gemm_as_text = json.loads(json.dumps(good))
    gemm_as_text["sites"][0]["gemms"]["fprop"] = "scaled_mm"
    number_as_text = json.loads(json.dumps(good))
    number_as_text["sites"][0]["gemms"]["dgrad"]["bf16_ms"] = "fast"
    return {
        "sites is a number": (json.dumps({**good, "sites": 5}), "sites: expected a list, got int"),
        "notes is a string": (json.dumps({**good, "notes": "none"}), "notes: expected a list, got str"),
        "a gemm is a string": (json.dumps(gemm_as_text), "sites[0] (0).gemms.fprop: expected an object"),
        "a number is a word": (json.dumps(number_as_text), "gemms.dgrad.bf16_ms: expected a number, got 'fast'"),
        "top-level list": (json.dumps([good]), "a plan is a JSON object, got list"),
        "100k-deep nesting": ('{"kind": "loka.dispatch.plan", "sites": ' + DEEP + "}", "nested too deeply"),
        "unknown kind": (json.dumps({**good, "kind": "loka.probe.report"}), "kind: expected 'loka.dispatch.plan'"),
        "schema_version 99": (json.dumps({**good, "schema_version": 99}), "schema_version: this loka reads 1"),
        "not UTF-8": ('{"kind": "\xff"}', "cannot read this plan file"),
    }


PLAN_CASES = _plan_cases()


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_malformed_plan_file_is_one_plan_error_line(tmp_path, case):
    text, message = PLAN_CASES[case]
    path = tmp_path / "plan.json"
    path.write_bytes(text.encode("latin-1") if case == "not UTF-8" else text.encode())
    for load in (load_plan, lambda p: loka.convert(nn.Sequential(nn.Linear(32, 16)), plan=p)):
        with pytest.raises(PlanError) as exc:
            load(path)
        assert message in str(exc.value) and str(path) in str(exc.value)
        assert "\n" not in str(exc.value)


def test_the_good_plan_of_the_malformed_cases_loads(tmp_path):
    """The cases above break one thing each in a plan that loads (so each failure is that one thing)."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_good_plan_doc()))
    assert load_plan(path).site("0").in_features == 32


GOOD_SITE = site("0", 32, 16)
REPORT_CASES = {
    "sites is a number": ({"kind": "loka.probe.report", "schema_version": 1, "sites": 5}, "sites: expected a list"),
    "errors is a string": (report({**GOOD_SITE, "errors": "high"}), "sites[0].errors: expected an object, got str"),
    "an error entry lacks ci_lo": (report({**GOOD_SITE, "errors": {"rowwise": {"fprop": {"mean": 0.1, "ci_hi": 0.2,
                                                                                        "n": 3}}}}),
                                   "sites[0].errors.rowwise.fprop: missing key 'ci_lo'"),
    "in_features is text": (report({**GOOD_SITE, "in_features": "32"}), "sites[0].in_features: expected an integer"),
    "top-level list": ([GOOD_SITE], "a probe report is a JSON object, got list"),
    "unknown kind": ({**report(GOOD_SITE), "kind": "loka.dispatch.plan"}, "kind: expected 'loka.probe.report'"),
    "schema_version 99": ({**report(GOOD_SITE), "schema_version": 99}, "this loka reads version 1, the file has 99"),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_malformed_report_is_one_line_and_loka_plan_exits_2(tmp_path, capsys, case):
    doc, message = REPORT_CASES[case]
    with pytest.raises(ReportSchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        report_sites(doc)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    assert main(["plan", "--report", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "plan.json").exists()


def test_deeply_nested_report_file_exits_2(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text('{"kind": "loka.probe.report", "schema_version": 1, "sites": ' + DEEP + "}")
    assert main(["plan", "--report", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and len(err.strip().splitlines()) == 1, err


def test_a_good_report_of_the_malformed_cases_plans(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report(GOOD_SITE)))
    assert main(["plan", "--report", str(path), "--out", str(tmp_path)]) == 0
    assert load_plan(tmp_path / "plan.json").site("0").in_features == 32
