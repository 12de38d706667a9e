"""ProbeReport: JSON round trip, schema validation with clear errors, Markdown and HTML forms."""

import json
import math

import pytest
import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.report import ProbeReport
from loka.probe.schema import SCHEMA_VERSION, ReportSchemaError
from probe_toy import ToyMLP, loss_fn, make_batch


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = ToyMLP()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("tensorwise", "rowwise"),
                                     predict=("mx",), stop_when_decided=False))
    for step in range(3):
        with probe.step(step):
            loss_fn(model, make_batch(step)).backward()
    probe.time_sites(kernels=["emulated"], warmup=0, iters=2)
    return probe.report(model="toy")


def test_json_round_trip(report):
    text = report.to_json()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    back = ProbeReport.from_json(text)
    assert back.doc["schema_version"] == SCHEMA_VERSION
    assert back.verdicts() == report.verdicts()
    doc = json.loads(text)
    doc["sites"][0]["errors"]["tensorwise"]["fprop"]["mean"] = "inf"  # how non-finite floats are written
    again = ProbeReport.from_json(json.dumps(doc))
    assert math.isinf(again.site("inp")["errors"]["tensorwise"]["fprop"]["mean"])
    assert "Infinity" not in again.to_json()
    s = back.site("hidden")
    assert s["in_features"] == 32 and s["m_values"] == [64]
    assert set(s["errors"]) == {"tensorwise", "rowwise"} and set(s["predicted_errors"]) == {"mx"}
    assert s["timings"]["representative"] is False and s["speedup"] is not None
    assert s["fits"]["input"][0]["family"] in ("normal", "laplace", "t", "lognorm")


def test_verdicts_have_reasons(report):
    assert all(s["reason"] for s in report.sites)
    hidden = report.site("hidden")
    assert hidden["verdict"] == "safe" and hidden["best_recipe"] in ("tensorwise", "rowwise")
    # CPU timings are not representative: speed comes from the H100 speed model at the site's shape.
    from loka.kernels.costmodel import bf16_us, kernel_us
    from loka.recipe import gemm_shape

    shapes = [gemm_shape(g, 64, hidden["in_features"], hidden["out_features"]) for g in ("fprop", "dgrad", "wgrad")]
    best = hidden["best_recipe"]
    expected = sum(bf16_us(*sh) for sh in shapes) / sum(
        min(kernel_us(k, best, g, *sh) for k in ("scaled_mm", "triton")) for g, sh in zip(("fprop", "dgrad", "wgrad"), shapes))
    assert hidden["speed_source"] == "model" and hidden["speedup"] == pytest.approx(expected, rel=1e-6)
    assert hidden["speed"] == ("fast" if expected > 1 else "slow")
    if hidden["speed"] == "slow":
        assert "predicted slower than bf16" in hidden["reason"] and "speed model" in hidden["reason"]


def _broken(report, edit):
    doc = json.loads(report.to_json())
    edit(doc)
    return json.dumps(doc)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["sites"][1]["errors"]["rowwise"]["fprop"].pop("ci_hi"), r"sites\[1\]\.errors\.rowwise\.fprop: missing key 'ci_hi'"),
        (lambda d: d.update(schema_version=99), "schema_version: this loka reads version 1"),
        (lambda d: d.update(kind="something"), "is this a probe report"),
        (lambda d: d["sites"][0].update(verdict="fine"), r"sites\[0\]\.verdict: 'fine' is not one of"),
        (lambda d: d["sites"][0].update(in_features="32"), r"sites\[0\]\.in_features: expected an integer"),
    ],
)
def test_validation_names_the_bad_field(report, edit, message):
    with pytest.raises(ReportSchemaError, match=message):
        ProbeReport.from_json(_broken(report, edit))


def test_not_json_is_a_clear_error():
    with pytest.raises(ReportSchemaError, match="not valid JSON"):
        ProbeReport.from_json("{oops")


def test_markdown_and_html(report, tmp_path):
    md = report.to_markdown()
    assert "| site |" in md and "`hidden`" in md and "tensorwise" in md and "not representative" in md
    assert md.count("\n| `") == 3
    html = report.to_html()
    # the toy's sites all have one modelled speedup: no error-vs-speed column, said in its place
    assert html.startswith("<!doctype html>") and html.count("data:image/png;base64,") == 2
    assert "No error-vs-speed plot: every site x recipe has the same speedup" in html
    paths = report.save(tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    assert ProbeReport.load(paths["json"]).verdicts() == report.verdicts()
