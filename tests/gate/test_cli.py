"""``loka gate`` end to end: exit codes 0 / 1 / 2, the table, the JSON, and no tracebacks."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from loka.gate import EvalOutputs
from loka.gate.cli import register
from loka.jsonio import dumps

from .helpers import synthetic_pair


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers())
    args = parser.parse_args(["gate", *argv, "--n-boot", "300"])
    return args.func(args)


@pytest.fixture
def saved(tmp_path):
    """Paths of a baseline, a harmless candidate and a harmful candidate."""
    a, good = synthetic_pair(n=6000, noise=0.002)
    bad = EvalOutputs.build(a.example_ids, a.labels, {"click": np.clip(a.probs["click"] * 1.5, 0, 1)},
                            model="ranker-a", model_fingerprint="bad")  # fmt: skip
    paths = {}
    for name, out in (("base", a), ("good", good), ("bad", bad)):
        paths[name] = str(tmp_path / f"{name}.npz")
        out.save(paths[name])
    return paths


def test_pass_exits_0_and_writes_json(saved, tmp_path, capsys):
    out_json = tmp_path / "result.json"
    assert _run(["--baseline", saved["base"], "--candidate", saved["good"], "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "loka gate: PASS" in table and "ne[click]" in table
    result = json.loads(out_json.read_text())
    assert result["verdict"] == "pass" and result["exit_code"] == 0
    assert {c["name"] for c in result["checks"]} == {"ne[click]", "auc[click]", "calibration[click]"}


def test_regression_exits_1(saved, capsys):
    assert _run(["--baseline", saved["base"], "--candidate", saved["bad"]]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out
    # a loose enough budget lets the same candidate pass
    assert _run(["--baseline", saved["base"], "--candidate", saved["bad"], "--budget-ne", "10"]) == 0


def _assert_bad_input(argv, capsys, match: str) -> None:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loka gate: could not evaluate:") and match in err
    assert "Traceback" not in err


def test_missing_file_exits_2(saved, tmp_path, capsys):
    _assert_bad_input(["--baseline", str(tmp_path / "nope.npz"), "--candidate", saved["good"]], capsys, "no such file")


def test_not_an_outputs_file_exits_2(saved, tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00garbage")
    _assert_bad_input(["--baseline", str(junk), "--candidate", saved["good"]], capsys, "not a saved EvalOutputs .npz file")


def test_different_models_exit_2(saved, tmp_path, capsys):
    other = EvalOutputs.load(saved["good"])
    path = str(tmp_path / "other.npz")
    EvalOutputs(other.example_ids, other.labels, other.probs, {**other.meta, "model": "ranker-b"}).save(path)
    _assert_bad_input(["--baseline", saved["base"], "--candidate", path], capsys, "different models")
    assert _run(["--baseline", saved["base"], "--candidate", path, "--allow-different-models"]) == 0


def test_different_eval_sets_exit_2(saved, tmp_path, capsys):
    b = EvalOutputs.load(saved["good"])
    keep = slice(0, b.n - 10)
    path = str(tmp_path / "fewer.npz")
    EvalOutputs(b.example_ids[keep], {t: v[keep] for t, v in b.labels.items()},
                {t: v[keep] for t, v in b.probs.items()}, b.meta).save(path)  # fmt: skip
    _assert_bad_input(["--baseline", saved["base"], "--candidate", path], capsys, "eval sets differ")


def _write_report(path, errors: dict) -> str:
    """A probe-report file with ``errors`` = {fqn: {recipe: {gemm: entry}}} (the fields the gate reads)."""
    sites = [{"fqn": fqn, "in_features": 16, "out_features": 8, "errors": per} for fqn, per in errors.items()]
    path.write_text(dumps({"kind": "loka.probe.report", "schema_version": 1, "sites": sites}))
    return str(path)


def test_bad_budget_and_one_report_exit_2(saved, tmp_path, capsys):
    _assert_bad_input(["--baseline", saved["base"], "--candidate", saved["good"], "--budget-ne", "-1"], capsys, "ne_rel")
    report = _write_report(tmp_path / "r.json", {"s": {"r": {"fprop": {"mean": 0.1, "ci_lo": 0.0, "ci_hi": 0.2, "n": 3,
                                                                        "threshold": 0.3}}}})
    _assert_bad_input(["--baseline", saved["base"], "--candidate", saved["good"], "--report-baseline", str(report)],
                      capsys, "both probe reports")  # fmt: skip
    _assert_bad_input(["--baseline", saved["base"], "--candidate", saved["good"], "--report-baseline", str(report),
                       "--report-candidate", str(tmp_path / "none.json")], capsys, "no such probe report")  # fmt: skip


def test_site_regression_from_reports_exits_1(saved, tmp_path, capsys):
    def report(mean: float) -> str:
        path = tmp_path / f"report_{mean}.json"
        entry = {"mean": mean, "ci_lo": mean * 0.9, "ci_hi": mean * 1.1, "n": 6, "threshold": 0.05}
        return _write_report(path, {"over.0": {"tensorwise": {"fprop": entry}}})

    args = ["--baseline", saved["base"], "--candidate", saved["good"], "--report-baseline", report(0.02)]
    assert _run([*args, "--report-candidate", report(0.02)]) == 0
    assert _run([*args, "--report-candidate", report(0.2)]) == 1
    assert "site over.0/tensorwise/fprop" in capsys.readouterr().out


def test_json_is_strict_with_non_finite_site_errors(saved, tmp_path):
    inf_entry = {"mean": float("inf"), "ci_lo": float("inf"), "ci_hi": float("inf"), "n": 2, "threshold": 0.05}
    ok_entry = {"mean": 0.01, "ci_lo": 0.0, "ci_hi": 0.02, "n": 2, "threshold": 0.05}
    reports = []
    for name, entry in (("a", ok_entry), ("b", inf_entry)):
        reports.append(_write_report(tmp_path / f"{name}.json", {"s": {"r": {"fprop": entry}}}))
    out_json = tmp_path / "result.json"
    argv = ["--baseline", saved["base"], "--candidate", saved["good"], "--report-baseline", reports[0],
            "--report-candidate", reports[1], "--json", str(out_json)]  # fmt: skip
    assert _run(argv) == 1
    text = out_json.read_text()
    assert "Infinity" not in text and "NaN" not in text
    site = next(c for c in json.loads(text)["checks"] if c["kind"] == "site")
    assert site["verdict"] == "regression" and site["ci_hi"] == "inf"


def test_save_outputs_writes_both_sides(saved, tmp_path, capsys):
    out_dir = tmp_path / "outs"
    assert _run(["--baseline", saved["base"], "--candidate", saved["good"], "--save-outputs", str(out_dir)]) == 0
    again = EvalOutputs.load(out_dir / "candidate.npz")
    assert again.eval_fingerprint == EvalOutputs.load(saved["good"]).eval_fingerprint
    assert f"baseline={saved['base']}" in capsys.readouterr().out


GOOD_SITE = {"fqn": "s", "in_features": 16, "out_features": 8,
             "errors": {"r": {"fprop": {"mean": 0.01, "ci_lo": 0.0, "ci_hi": 0.02, "n": 2, "threshold": 0.05}}}}
MALFORMED_REPORTS = {  # issue 19 item 7: each ended in a traceback or was accepted
    "sites is a number": ('{"kind": "loka.probe.report", "schema_version": 1, "sites": 5}', "sites: expected a list"),
    "errors is a string": (json.dumps({"kind": "loka.probe.report", "schema_version": 1,
                                       "sites": [{**GOOD_SITE, "errors": "high"}]}), "sites[0].errors: expected an object"),
    "top-level list": (json.dumps([GOOD_SITE]), "a probe report is a JSON object, got list"),
    "100k-deep nesting": ('{"kind": "loka.probe.report", "sites": ' + "[" * 100_000 + "]" * 100_000 + "}",
                          "nested too deeply"),
    "unknown kind": (json.dumps({"kind": "loka.dispatch.plan", "schema_version": 1, "sites": [GOOD_SITE]}),
                     "kind: expected 'loka.probe.report'"),
    "schema_version 99": (json.dumps({"kind": "loka.probe.report", "schema_version": 99, "sites": [GOOD_SITE]}),
                          "schema_version: this loka reads version 1"),
    "not JSON": ("{sites: [", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_REPORTS))
def test_malformed_probe_report_is_one_line_and_exit_2(saved, tmp_path, capsys, case):
    text, message = MALFORMED_REPORTS[case]
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    good = _write_report(tmp_path / "good.json", {"s": GOOD_SITE["errors"]})
    for pair in ((good, str(bad)), (str(bad), good)):
        assert _run(["--baseline", saved["base"], "--candidate", saved["good"], "--report-baseline", pair[0],
                     "--report-candidate", pair[1]]) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_same_outputs_on_both_sides_say_so(saved, capsys):
    assert _run(["--baseline", saved["base"], "--candidate", saved["base"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loka gate: IDENTICAL") and "no change to gate" in out and "PASS" not in out
