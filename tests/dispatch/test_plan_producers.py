"""The planner prices FP8 at producer sites without the input's cast, and its choices follow the
committed GPU measurements (bench/results/gemm_calibration.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from loka.dispatch import Budget, plan
from loka.dispatch.cli import main as plan_main
from loka.dispatch.producers import producer_sites
from loka.kernels.costmodel import H200_SXM, kernel_us, quantize_us
from loka.recipe import gemm_shape
from loka.timer import device_name

from dispatch_report_fixtures import GEMMS, report, site

CALIBRATION = Path(__file__).resolve().parents[2] / "bench" / "results" / "gemm_calibration.json"


def _h200_rows() -> list[dict]:
    run = json.loads(CALIBRATION.read_text())["h200_2026-11-30"]
    return [dict(zip(run["columns"], row)) for row in run["median_ms"]]


def _fqn(r: dict) -> str:
    return f"s{r['m']}x{r['k']}x{r['n']}"


def _calibration_report(recipes=("rowwise",)) -> dict:
    return report(*(site(_fqn(r), r["k"], r["n"], m=r["m"], errors={rc: {g: 0.01 for g in GEMMS} for rc in recipes})
                    for r in _h200_rows()))


def test_h200_plan_follows_the_measured_h200_gemms_with_and_without_producers():
    rows, doc = _h200_rows(), _calibration_report()
    plain = plan(doc, Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False)
    fed = plan(doc, Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False,
               producers={_fqn(r): "norm_quant" for r in rows})
    flipped = 0
    for r in rows:
        before, after = plain.site(_fqn(r)).gemms["fprop"], fed.site(_fqn(r)).gemms["fprop"]
        # Casts paid per call: FP8 is chosen exactly where the compiled cast + _scaled_mm beat bf16 on the H200.
        assert before.is_fp8 == (r["scaled_mm_quant_compiled"] < r["bf16"]), (r, before.reason)
        # Input from the producer: FP8 only where the pre-quantized GEMM beat bf16 there, and wherever
        # FP8 already won with the cast.
        assert after.is_fp8 <= (r["scaled_mm_ceiling"] < r["bf16"]), (r, after.reason)
        assert after.is_fp8 >= before.is_fp8, r
        assert (fed.site(_fqn(r)).producer == "norm_quant") == after.is_fp8
        flipped += after.is_fp8 and not before.is_fp8
    assert flipped >= 1  # 32768x1024x1024: 0.87x of bf16 with a compiled cast, 1.44x pre-quantized (measured)


def test_producer_site_is_priced_at_the_speed_models_gemm_without_the_input_cast():
    m, k, n = 32768, 1024, 1024
    doc = report(site("a", k, n, m=m, errors={"rowwise": {g: 0.01 for g in GEMMS}}))
    p = plan(doc, Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False, producers={"a": "norm_quant"})
    c = p.site("a").gemms["fprop"]
    assert c.planned_ms == pytest.approx(kernel_us("scaled_mm", "rowwise", "fprop", m, k, n, H200_SXM,
                                                   a_in_producer=True) / 1e3, rel=1e-9)
    assert "norm_quant" in c.reason and f"{quantize_us(m, k, H200_SXM) / 1e3:.3g} ms" in c.reason
    d = p.site("a").gemms["dgrad"]  # dgrad's dy is not the producer's: priced with its cast
    if d.is_fp8:
        dm, dk, dn = gemm_shape("dgrad", m, k, n)
        assert d.planned_ms == pytest.approx(kernel_us("scaled_mm", "rowwise", "dgrad", dm, dk, dn, H200_SXM) / 1e3)
    assert any("priced without the input's cast" in note for note in p.notes)


@pytest.mark.parametrize("producer, fed", [("norm_quant", False), ("compiled_cast", True)])
def test_tensorwise_input_is_fed_only_by_a_compiled_cast(producer, fed):
    """The fused norm kernel writes row scales; a compiled cast takes any dynamic scaling."""
    m, k, n = 32768, 1024, 1024
    doc = report(site("a", k, n, m=m, errors={"tensorwise": {g: 0.01 for g in GEMMS}}))
    p = plan(doc, Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False, producers={"a": producer})
    want = kernel_us("scaled_mm", "tensorwise", "fprop", m, k, n, H200_SXM, a_in_producer=fed)
    got = p.site("a").gemms["fprop"]
    if got.is_fp8:
        assert got.planned_ms == pytest.approx(want / 1e3, rel=1e-9)
    assert (p.site("a").producer == producer) == (fed and got.is_fp8)


def _measured_site(device: str, median_ms: float, bf16_ms: float, m: int = 256, k: int = 128, n: int = 64):
    entries = [(g, "scaled_mm", "rowwise", median_ms) for g in GEMMS]
    return site("a", k, n, m=m, bf16_ms=bf16_ms, entries=entries, device=device,
                errors={"rowwise": {g: 0.01 for g in GEMMS}})


def test_measured_timings_of_this_device_drop_the_cast_timed_here():
    """Measured here (CPU): FP8 timed as fast as bf16 is not chosen; minus the cast it is."""
    here = device_name(torch.device("cpu"))
    doc = report(_measured_site(here, median_ms=1.0, bf16_ms=1.0))
    plain = plan(doc, Budget(), device="cpu", kernels=["scaled_mm"], progress=False)
    fed = plan(doc, Budget(), device="cpu", kernels=["scaled_mm"], progress=False, producers={"a": "norm_quant"})
    assert not plain.site("a").gemms["fprop"].is_fp8
    c = fed.site("a").gemms["fprop"]
    assert c.is_fp8 and 0.05 <= c.planned_ms < 1.0, c
    assert not fed.site("a").gemms["dgrad"].is_fp8  # only fprop's input comes from the producer
    assert fed.site("a").producer == "norm_quant"


def test_timings_of_another_device_are_not_discounted_and_the_note_says_why():
    doc = report(_measured_site("NVIDIA H200", median_ms=1.0, bf16_ms=1.0))
    p = plan(doc, Budget(), device="cpu", kernels=["scaled_mm"], progress=False, producers={"a": "norm_quant"})
    assert not p.site("a").gemms["fprop"].is_fp8 and p.site("a").producer is None
    assert not any("unknown here" in note for note in p.notes)  # no producer site was taken: nothing to say
    doc = report(_measured_site("NVIDIA H200", median_ms=0.5, bf16_ms=1.0))
    p = plan(doc, Budget(), device="cpu", kernels=["scaled_mm"], progress=False, producers={"a": "norm_quant"})
    assert p.site("a").gemms["fprop"].planned_ms == 0.5 and p.site("a").producer is None


def test_triton_gains_nothing_from_a_producer():
    m, k, n = 32768, 1024, 1024
    doc = report(site("a", k, n, m=m, errors={"rowwise": {g: 0.01 for g in GEMMS}}))
    p = plan(doc, Budget(), speed_model="h200", kernels=["triton"], progress=False, producers={"a": "norm_quant"})
    assert p.site("a").producer is None


@pytest.mark.parametrize("producers, words", [({"nope": "norm_quant"}, "does not have"),
                                              ({"a": "fused"}, "unknown values")])
def test_bad_producers_are_refused_with_the_fix(producers, words):
    doc = report(site("a", 1024, 1024, m=4096))
    with pytest.raises(ValueError, match=words):
        plan(doc, Budget(), speed_model="h200", progress=False, producers=producers)


def test_cli_producers_file(tmp_path, capsys):
    rows = _h200_rows()
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps(_calibration_report()))
    prod = tmp_path / "producers.json"
    prod.write_text(json.dumps({_fqn(r): "norm_quant" for r in rows}))
    out = tmp_path / "plan.json"
    assert plan_main(["plan", "--report", str(rep), "--speed-model", "h200", "--kernels", "scaled_mm",
                      "--producers", str(prod), "--out", str(out.parent), "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert any(s.get("producer") == "norm_quant" for s in doc["sites"])
    prod.write_text("[1, 2]")
    assert plan_main(["plan", "--report", str(rep), "--speed-model", "h200", "--producers", str(prod),
                      "--out", str(out.parent), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--producers" in err and "expected a JSON object" in err and len(err.splitlines()) == 1


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc, self.shared = nn.LayerNorm(32), nn.Linear(32, 16), nn.LayerNorm(16)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.shared(self.fc(self.norm(x)))
        return self.a(h) + self.b(h)  # the shared norm feeds two Linears: no producer


def test_producer_sites_are_the_linears_fed_only_by_their_norm():
    assert producer_sites(_Block(), torch.randn(8, 32)) == {"fc": "norm_quant"}


def test_plan_states_its_predicted_step_and_keeps_it_through_the_file(tmp_path):
    from loka.dispatch import load_plan
    from loka.dispatch.predict import with_predicted_step

    rows = _h200_rows()
    p = plan(_calibration_report(), Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False)
    assert "Predicted training step: not stated" in p.summary()
    t = p.totals()
    stated = with_predicted_step(p, 10.0, "test: a 10 ms bf16 step")
    want = 10.0 / (10.0 - t["saved_ms"])
    assert stated.step["speedup"] == pytest.approx(want) and t["saved_ms"] > 0
    back = load_plan(stated.save(tmp_path / "plan.json"))
    assert back.step == stated.step and f"speed-up {want:.2f}x" in back.summary()
    assert "step" not in json.loads(p.to_json())  # plans without it keep their old form
    with pytest.raises(ValueError, match="source"):
        with_predicted_step(p, 10.0, " ")
    with pytest.raises(ValueError, match="another device"):  # a saving larger than the step
        with_predicted_step(p, t["saved_ms"] / 2, "too short")
    doc = json.loads(stated.to_json())
    doc["step"]["speedup"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(Exception, match="step.speedup: expected a number"):
        load_plan(tmp_path / "bad.json")
    assert len(rows) == len(p.sites)


def test_cli_bf16_step_ms(tmp_path, capsys):
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps(_calibration_report()))
    out = tmp_path / "plan.json"
    assert plan_main(["plan", "--report", str(rep), "--speed-model", "h200", "--kernels", "scaled_mm",
                      "--bf16-step-ms", "50", "--out", str(out.parent), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["step"]["bf16_step_ms"] == 50.0
    assert "Predicted training step: bf16 50 ms" in capsys.readouterr().out
    assert plan_main(["plan", "--report", str(rep), "--speed-model", "h200", "--bf16-step-ms", "-1",
                      "--out", str(out.parent), "--device", "cpu"]) == 2
    assert "bf16_step_ms" in capsys.readouterr().err


def test_with_producers_keeps_a_site_that_already_has_its_producer():
    """A site the planner priced with a producer is not given a second one (nor discounted twice)."""
    from dataclasses import replace

    from loka.dispatch.producers import with_producers
    from loka.kernels.costmodel import H200_SXM

    model, x = _Block(), torch.randn(8, 32)
    doc = report(site("fc", 32, 16, m=8, errors={"rowwise": {g: 0.01 for g in GEMMS}}),
                 *(site(f, 16, 16, m=8) for f in ("a", "b")))
    p = plan(doc, Budget(min_speedup=1.0), speed_model="h200", kernels=["scaled_mm"], progress=False)
    fc = p.site("fc")
    forced = replace(p, sites=[replace(fc, gemms={**fc.gemms, "fprop": replace(fc.gemms["fprop"], kernel="scaled_mm",
                                                                               recipe="rowwise", planned_ms=1.0)},
                                       producer="compiled_cast"), p.site("a"), p.site("b")])
    again = with_producers(forced, model, x, dev=H200_SXM)
    assert again.site("fc").producer == "compiled_cast" and again.site("fc").gemms["fprop"].planned_ms == 1.0
    unset = with_producers(replace(forced, sites=[replace(forced.site("fc"), producer=None), p.site("a"), p.site("b")]),
                           model, x, dev=H200_SXM)
    assert unset.site("fc").producer == "norm_quant"


def test_compiled_cast_also_prices_dgrad_without_dys_cast():
    """A site proven on a training step has dgrad's dy cast in the producing backward kernel too."""
    m, k, n = 32768, 4096, 4096
    doc = report(site("a", k, n, m=m, errors={"rowwise": {g: 0.01 for g in GEMMS}}))
    p = plan(doc, Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False, producers={"a": "compiled_cast"})
    for gemm, fed in (("fprop", True), ("dgrad", True), ("wgrad", False)):
        c = p.site("a").gemms[gemm]
        assert c.is_fp8, (gemm, c.reason)
        want = kernel_us("scaled_mm", "rowwise", gemm, *gemm_shape(gemm, m, k, n), H200_SXM, a_in_producer=fed)
        assert c.planned_ms == pytest.approx(want / 1e3, rel=1e-9), gemm
    nq = plan(doc, Budget(), speed_model="h200", kernels=["scaled_mm"], progress=False, producers={"a": "norm_quant"})
    assert nq.site("a").gemms["dgrad"].planned_ms > p.site("a").gemms["dgrad"].planned_ms
