"""loka.dispatch.headroom: each GEMM priced as the speed model prices it, bands split at the measured
region, Amdahl's step figures, a plan's capture, the levers, and the census of a forward."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from loka.dispatch.headroom import Band, HeadroomOptions, price_gemm, saved_ms, speedup
from loka.dispatch.headroom_census import GemmSite, StepCensus, record_gemms
from loka.dispatch.headroom_estimate import estimate_headroom
from loka.dispatch.headroom_levers import crossover_width
from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.kernels.costmodel import CALIBRATED_REGIONS, H100_SXM, H200_SXM, bf16_us, is_extrapolated, kernel_us
from loka.recipe import GEMMS, gemm_shape

ROOT = Path(__file__).resolve().parents[2]


def _best(gemm, m, k, n, fed, cached):
    shape = gemm_shape(gemm, m, k, n)
    return min([bf16_us(*shape, H200_SXM)] + [kernel_us("scaled_mm", r, gemm, *shape, H200_SXM, a_in_producer=fed,
                                                         b_cached=cached) for r in ("tensorwise", "rowwise")])


@pytest.mark.parametrize("gemm", GEMMS)
def test_each_regime_prices_a_gemm_as_the_speed_model_does(gemm):
    rng = random.Random()
    m, k, n = rng.choice([8192, 32768, 2**20]), rng.choice([256, 1024, 4096]), rng.choice([512, 2048, 8192])
    site = GemmSite("a.b", m, k, n)
    opts = HeadroomOptions(producers={"a.b": "norm_quant"})
    assert price_gemm(site, gemm, "per_call", H200_SXM, opts).best_us == _best(gemm, m, k, n, False, False)
    assert price_gemm(site, gemm, "prequantized", H200_SXM, opts).best_us == _best(gemm, m, k, n, True, True)
    # norm_quant feeds fprop's input only, and only the rowwise recipe
    prod = price_gemm(site, gemm, "producers", H200_SXM, opts)
    if gemm != "fprop":
        assert prod.best_us == _best(gemm, m, k, n, False, False)
    else:
        shape = gemm_shape(gemm, m, k, n)
        fed_row = kernel_us("scaled_mm", "rowwise", gemm, *shape, H200_SXM, a_in_producer=True)
        tw = kernel_us("scaled_mm", "tensorwise", gemm, *shape, H200_SXM)
        assert prod.best_us == min(bf16_us(*shape, H200_SXM), fed_row, tw)


def test_recompute_doubles_fprop_and_bmm_stays_bf16():
    s = GemmSite("x", 8192, 4096, 4096, recomputed=True)
    on, off = HeadroomOptions(), HeadroomOptions(recompute=False)
    assert price_gemm(s, "fprop", "per_call", H200_SXM, on).bf16_us == 2 * price_gemm(s, "fprop", "per_call", H200_SXM, off).bf16_us
    assert price_gemm(s, "dgrad", "per_call", H200_SXM, on).bf16_us == price_gemm(s, "dgrad", "per_call", H200_SXM, off).bf16_us
    b = GemmSite("fm", 64, 128, 32, kind="bmm", batch=8192)
    p = price_gemm(b, "fprop", "prequantized", H200_SXM, on)
    assert p.recipe is None and p.bf16_us == p.best_us == bf16_us(64 * 8192, 128, 32, H200_SXM)


def test_min_width_keeps_narrow_sites_in_bf16():
    s = GemmSite("x", 32768, 1024, 1024)
    assert price_gemm(s, "fprop", "prequantized", H200_SXM, HeadroomOptions()).recipe is not None
    assert price_gemm(s, "fprop", "prequantized", H200_SXM, HeadroomOptions(min_width=2048)).recipe is None


def test_extrapolated_gains_widen_the_band_and_calibrated_ones_do_not():
    inside = GemmSite("in", 8192, 8192, 8192)  # every GEMM inside the H200 region (wgrad is [N, M]·[K, M]ᵀ)
    outside = GemmSite("out", 2**20, 256, 768)  # a million rows: never measured
    assert not is_extrapolated(H200_SXM, "scaled_mm", 8192, 4096, 4096)
    assert is_extrapolated(H200_SXM, "scaled_mm", 2**20, 256, 768)
    opts = HeadroomOptions()
    p_in = [price_gemm(inside, g, "prequantized", H200_SXM, opts) for g in GEMMS]
    p_out = [price_gemm(outside, g, "prequantized", H200_SXM, opts) for g in GEMMS]
    assert any(p.saved_us > 0 for p in p_out) and all(p.extrapolated for p in p_out if p.recipe)
    b_in, b_all = saved_ms(p_in), saved_ms(p_in + p_out)
    assert b_in.is_point and b_in.low > 0
    assert b_all.low == pytest.approx(b_in.low) and b_all.high > b_all.low


def test_amdahl_step_speedup():
    rng = random.Random()
    step, lo, hi = rng.uniform(50, 200), rng.uniform(0, 10), rng.uniform(10, 40)
    s = speedup(step, Band(lo, hi))
    assert s.low == pytest.approx(1 / (1 - lo / step)) and s.high == pytest.approx(1 / (1 - hi / step))


def test_calibrated_regions_are_the_measured_extent_of_the_committed_calibration():
    doc = json.loads((ROOT / "bench/results/gemm_calibration.json").read_text())
    rows = doc["h200_2026-11-30"]["median_ms"]
    ceiling = doc["h200_2026-11-30"]["ceilings"]["shape"]
    for r in CALIBRATED_REGIONS[H200_SXM.name]:
        assert r.m == (min(x[0] for x in rows), max(x[0] for x in rows))
        assert r.k == (min(x[1] for x in rows), max(ceiling[1], max(x[1] for x in rows)))
        assert r.n == (min(x[2] for x in rows), max(ceiling[2], max(x[2] for x in rows)))
    h100 = doc["h100_2026-11-22"]["prequantized_speedup"]
    for r in CALIBRATED_REGIONS[H100_SXM.name]:
        assert r.m == (min(e["m"][0] for e in h100), max(e["m"][1] for e in h100))
        assert r.k[0] == min(e["kn"][0] for e in h100)


def test_options_refuse_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="attention_efficiency"):
        HeadroomOptions(attention_efficiency=0.0)
    with pytest.raises(ValueError, match="norm_quant"):
        HeadroomOptions(producers={"a": "fused_magic"})
    with pytest.raises(ValueError, match="step_source"):
        HeadroomOptions(bf16_step_ms=100.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        GemmSite("x", 0, 4, 4)


def _census():
    return StepCensus(sites=(GemmSite("big.a", 8192, 4096, 4096), GemmSite("big.b", 8192, 8192, 4096),
                             GemmSite("small.c", 8192, 256, 256)), label="toy", attention_fwd_flops=1e12,
                      dense_params=10**8, elementwise_fwd_bytes=4e9, fused_fwd_bytes=1e9)


def test_estimate_plan_capture_and_levers():
    c = _census()
    site = lambda f, fp8: SitePlan(f, 4096, 4096, 8192, {g: (GemmChoice("scaled_mm", "rowwise") if fp8 else
                                                            GemmChoice(reason="kept bf16: its FP8 error alone would cost"))
                                                         for g in GEMMS})
    plan = Plan(sites=[site("big.a", True), site("big.b", False)], budget={})
    doc = estimate_headroom(c, H200_SXM, HeadroomOptions(), plan)
    prod = doc["regimes"]["producers"]
    a_saved = sum(price_gemm(c.sites[0], g, "producers", H200_SXM, HeadroomOptions()).saved_us for g in GEMMS) / 1e3
    assert doc["captured"]["saved_ms"]["high"] == pytest.approx(a_saved)
    assert doc["captured"]["share_of_bound"]["high"] == pytest.approx(a_saved / prod["saved_ms"]["high"])
    gains = [lv["gain_ms"]["high"] for lv in doc["levers"]]
    assert gains == sorted(gains, reverse=True)
    acc = [lv for lv in doc["levers"] if lv["lever"] == "accuracy"]
    b_saved = sum(price_gemm(c.sites[1], g, "producers", H200_SXM, HeadroomOptions()).saved_us for g in GEMMS) / 1e3
    assert len(acc) == 1 and acc[0]["gain_ms"]["high"] == pytest.approx(b_saved)
    assert doc["regimes"]["per_call"]["bound"]["high"] <= prod["bound"]["high"] <= doc["regimes"]["prequantized"]["bound"]["high"]
    with pytest.raises(ValueError, match="census does not have"):
        estimate_headroom(c, H200_SXM, HeadroomOptions(producers={"nope": "norm_quant"}))


def test_crossover_width_is_the_first_width_that_wins():
    opts = HeadroomOptions()
    w = crossover_width(8192, H200_SXM, "prequantized", opts)
    assert w is not None
    assert price_gemm(GemmSite("w", 8192, w, w), "fprop", "prequantized", H200_SXM, opts).recipe is not None
    smaller = [x for x in (128, 256, 384, 512, 768, 1024, 1536, 2048) if x < w]
    assert all(price_gemm(GemmSite("w", 8192, x, x), "fprop", "prequantized", H200_SXM, opts).recipe is None
               for x in smaller)


class _FM(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):  # x [B, F, 24]
        y = self.norm(self.proj(x))  # [B, F, 8]
        return torch.bmm(y.transpose(1, 2), y)  # [B, 8, 8]


def test_record_gemms_sees_linears_bmm_and_elementwise_on_fake_tensors():
    with FakeTensorMode():
        model = _FM()
        x = torch.randn(16, 5, 24)
        rec = record_gemms(model, lambda: model(x), recomputed=lambda f: f == "proj")
    sites = {s.fqn: s for s in rec["sites"]}
    assert sites["proj"] == GemmSite("proj", 80, 24, 8, recomputed=True)
    assert sites["(root)"] == GemmSite("(root)", 8, 5, 8, kind="bmm", batch=16)
    assert rec["elementwise_fwd_bytes"] >= 2 * 80 * 8 * 4  # the norm read and wrote [80, 8] fp32 at least
    assert rec["fused_fwd_bytes"] == 2.0 * (80 * 24 + 80 * 8)


def test_plan_reason_says_when_a_modelled_win_is_extrapolated():
    """A site planned on speed-model timings outside the measured region says so in its reason."""
    from dispatch_report_fixtures import report, site

    from loka.dispatch.planner import plan
    from loka.probe.timing import time_site

    far = time_site((2**20, 1024, 1024), ["rowwise"], model=H200_SXM, kernels=["scaled_mm"]).to_dict()  # a million rows
    near = time_site((8192, 8192, 8192), ["rowwise"], model=H200_SXM, kernels=["scaled_mm"]).to_dict()
    assert all(e["extrapolated"] for e in far["entries"]) and not any(e["extrapolated"] for e in near["entries"])
    doc = report(site("far", 1024, 1024, m=2**20), site("near", 8192, 8192, m=8192))
    p = plan(doc, timings={"far": far, "near": near}, device="cpu", progress=False,
             kernels=["scaled_mm"], producers={"far": "norm_quant"})
    fprop = {s.fqn: s.gemms["fprop"] for s in p.sites}
    assert fprop["far"].is_fp8 and "extrapolated outside its measured range" in fprop["far"].reason
    assert fprop["near"].is_fp8 and "extrapolated" not in fprop["near"].reason


def test_plan_cli_prints_the_headroom_of_its_sites_and_what_it_captures(tmp_path, capsys):
    from dispatch_report_fixtures import report, site

    from loka.dispatch.cli import register
    import argparse

    rep = tmp_path / "probe.json"
    rep.write_text(json.dumps(report(site("big", 8192, 8192, m=8192), site("small", 256, 256, m=8192))))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--report", str(rep), "--speed-model", "h200", "--device", "cpu",
                              "--out", str(tmp_path / "plan.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("FP8 headroom"))
    assert "H200 SXM" in line and "this plan captures" in line and "the plan's sites only" in line


def test_a_measured_step_anchors_the_step_speedup_and_says_so():
    c = _census()
    step = random.uniform(200, 400)
    doc = estimate_headroom(c, H200_SXM, HeadroomOptions(bf16_step_ms=step, step_source="H200, bench/ranker.py"))
    assert doc["step"]["bf16_ms"] == step and doc["step"]["source"] == "measured: H200, bench/ranker.py"
    for r in doc["regimes"].values():
        assert r["step"]["high"] == pytest.approx(step / (step - r["saved_ms"]["high"]))
        assert r["step"]["high"] <= r["bound"]["high"]  # the rest of the step only dilutes the gain
    short = estimate_headroom(c, H200_SXM, HeadroomOptions(bf16_step_ms=0.01, step_source="x"))
    assert "shorter than the modelled GEMMs" in short["notes"][0]


def test_serving_prices_fprop_with_frozen_weights_and_no_update():
    c = _census()
    doc = estimate_headroom(c, H200_SXM, HeadroomOptions(serving=True))
    fed = price_gemm(c.sites[0], "fprop", "per_call", H200_SXM, HeadroomOptions(serving=True))
    shape = gemm_shape("fprop", 8192, 4096, 4096)
    assert fed.best_us == min([bf16_us(*shape, H200_SXM)] + [kernel_us("scaled_mm", r, "fprop", *shape, H200_SXM,
                                                                       b_cached=True) for r in ("tensorwise", "rowwise")])
    assert all(r["gemms"] == len(c.sites) for r in doc["regimes"].values())  # fprop only
    assert doc["step"]["parts_ms"]["optimizer"] == 0.0


class _Block(nn.Module):
    """x[B, S, D] -> LayerNorm -> qkv Linear -> SDPA -> out Linear (+ x)."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, S, D/H]
        return x + self.out(y.transpose(1, 2).reshape(b, s, d))


def test_model_headroom_of_any_model_on_fake_tensors():
    from loka.dispatch.headroom_estimate import model_headroom

    with FakeTensorMode():
        model = _Block()
        x = torch.randn(32, 128, 64)
        doc = model_headroom(model, x, "h200", label="block")
    assert doc["model"] == "block" and doc["assumptions"]["producers"] == {"qkv": "norm_quant"}
    attention = 2.0 * (32 * 4 * 128) * 128 * (16 + 16)  # QKᵀ and AV over 32 x 4 heads of 128 tokens
    assert doc["step"]["parts_ms"]["attention"] == pytest.approx(3 * attention / (H200_SXM.bf16_tflops * 1e9))
    assert doc["step"]["parts_ms"]["optimizer"] == pytest.approx(28 * sum(p.numel() for p in _Block().parameters())
                                                                 / (H200_SXM.hbm_tbps * 1e9))
    with pytest.raises(ValueError, match="speed model"):
        model_headroom(_Block(), torch.randn(2, 4, 64), "b300")
