"""`loka plan --speed-model` and `--keep-bf16`, and reasons for bf16 that say what happened."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from loka.dispatch import Budget, plan
from loka.dispatch.cli import main as plan_main
from loka.dispatch.microbench import model_timings
from loka.kernels import KERNELS
from loka.kernels.costmodel import H100_SXM, H200_SXM

from dispatch_report_fixtures import GEMMS, report, site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probe"))
from probe_toy import ToyMLP, loss_fn, make_batch  # noqa: E402

FAST = [(g, "scaled_mm", "rowwise", 0.5) for g in GEMMS]


def _cost(rel_loss_delta: float) -> float:
    """The NE cost the planner charges one GEMM of a fixture site: sensitivity x error bound.

    The fixture's error has ci_hi 0.05 and mean 0.04, and its sensitivity coefficient is
    rel_loss_delta / mean error (loka.probe.reader), so the cost is rel_loss_delta * 0.05 / 0.04."""
    return rel_loss_delta * 0.05 / 0.04


def test_budget_too_small_for_any_gemm_says_so_not_that_it_was_spent():
    rep = report(site("a", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-2}))
    cap = _cost(1e-2) / 10
    p = plan(rep, Budget(max_model_ne_delta=cap), progress=False)
    assert p.totals()["fp8_gemms"] == 0
    reason = p.site("a").gemms["fprop"].reason
    cost, budget = map(float, re.search(r"alone would cost (\S+) relative NE .* model-level NE budget (\S+)$", reason).groups())
    assert cost == pytest.approx(_cost(1e-2), rel=0.05) and budget == pytest.approx(cap, rel=0.05)
    assert "went to" not in reason and "spent" not in reason


def test_budget_spent_on_others_names_how_much_and_on_how_many():
    rep = report(site("robust", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-4}),
                 site("sensitive", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-2}))
    cap = 4e-4  # fits robust's three GEMMs (3 x 1.25e-4), none of sensitive's (1.25e-2 each)
    p = plan(rep, Budget(max_model_ne_delta=cap), progress=False)
    assert all(p.site("robust").gemms[g].is_fp8 for g in GEMMS)
    reason = p.site("sensitive").gemms["fprop"].reason
    assert "alone would cost" in reason  # 1.25e-2 > 4e-4: it never could fit


def test_outbid_gemm_is_told_the_budget_went_elsewhere():
    # Two sites whose GEMMs each fit alone but not all together: the ones that save more time win.
    slow_saver = [(g, "scaled_mm", "rowwise", 0.9) for g in GEMMS]  # saves 0.1 ms a GEMM
    rep = report(site("big", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-4}),
                 site("small", 256, 512, bf16_ms=1.0, entries=slow_saver, sensitivity={"rowwise": 1e-4}))
    cap = 3 * _cost(1e-4) * 1.01
    p = plan(rep, Budget(max_model_ne_delta=cap), progress=False)
    assert all(p.site("big").gemms[g].is_fp8 for g in GEMMS) and not p.site("small").is_fp8
    reason = p.site("small").gemms["fprop"].reason
    used, total = map(float, re.search(r"NE budget \((\S+) of (\S+) used\) went to 3 GEMM\(s\) that save more time",
                                       reason).groups())
    assert used == pytest.approx(3 * _cost(1e-4), rel=0.05) and total == pytest.approx(cap, rel=0.05)


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ToyMLP()
    from loka.probe import Probe, ProbeConfig, SamplingSchedule

    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("rowwise",)))
    for step in range(3):
        with probe.step(step):
            loss_fn(model, make_batch(step)).backward()
    out = tmp_path_factory.mktemp("probe")
    return probe.report(model="toy").save(out)["json"]


def _fp8_kernels_here() -> list[str]:
    return [k.name for k in KERNELS if not k.hp and k.name != "emulated" and k.available(torch.device("cpu"))]


@pytest.mark.parametrize("name, dev", [("h100", H100_SXM), ("h200", H200_SXM)])
def test_cli_speed_model_plans_like_the_api_with_that_model(toy_report, tmp_path, name, dev):
    out = tmp_path / "plan.json"
    assert plan_main(["plan", "--report", str(toy_report), "--speed-model", name, "--device", "cpu",
                      "--out", str(out.parent)]) == 0
    doc = json.loads(out.read_text())
    expected = plan(str(toy_report), Budget(), timings=model_timings(str(toy_report), _fp8_kernels_here(), dev),
                    device="cpu", progress=False)
    assert doc["device"]["name"] == dev.name and doc["device"]["source"] == "model"
    got = {s["fqn"]: {g: (c["kernel"], c["recipe"], c["reason"]) for g, c in s["gemms"].items()} for s in doc["sites"]}
    want = {s.fqn: {g: (c.kernel, c.recipe, c.reason) for g, c in s.gemms.items()} for s in expected.sites}
    assert got == want


def test_cli_keep_bf16_file_keeps_the_site_with_its_reason(toy_report, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"hidden": "final task head (policy)"}))
    out = tmp_path / "plan.json"
    assert plan_main(["plan", "--report", str(toy_report), "--speed-model", "h100", "--keep-bf16", str(keep),
                      "--device", "cpu", "--out", str(out.parent)]) == 0
    hidden = next(s for s in json.loads(out.read_text())["sites"] if s["fqn"] == "hidden")
    assert all(c["reason"] == "kept bf16 by policy: final task head (policy)" for c in hidden["gemms"].values())


@pytest.mark.parametrize("content, words", [("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                            (None, "cannot read it")])
def test_cli_bad_keep_bf16_file_is_one_line_exit_2(toy_report, tmp_path, capsys, content, words):
    keep = tmp_path / "keep.json"
    if content is not None:
        keep.write_text(content)
    rc = plan_main(["plan", "--report", str(toy_report), "--keep-bf16", str(keep), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and "--keep-bf16" in err and len(err.splitlines()) == 1


def test_unknown_speed_model_is_refused_with_the_choices(toy_report):
    with pytest.raises(ValueError, match="speed model 'a100' is not known; use one of b200, h100, h200, mi300x, mi350x, measured"):
        plan(str(toy_report), speed_model="a100", progress=False)
