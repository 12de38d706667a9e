"""The GPU speed model against the committed GEMM measurements (bench/results/gemm_calibration.json).

Two measurements: the H100 figures of 2026-11-22 that ``H100_SXM`` is fitted to, and the H200 run
of 2026-11-30 (recorded command) that ``H200_SXM`` is fitted to. Both are fits, so these tests check
that the fits hold what the records say, not a prediction on unseen data. Tolerance: a measured ratio stated to one
decimal ("1.3x") is the band [1.25, 1.35]; the model must land within TOL (10%, relative) of the
band. Where it does not, the point is an expected failure with the measured and modelled figures
in its reason, so a refit that fixes it shows up as an XPASS (strict) and must update the record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loka.probe.timing import time_site
from loka.kernels.costmodel import H100_SXM, H200_SXM, DeviceModel, bf16_us, fp8_gemm_us, kernel_us, quantize_us

CALIBRATION = Path(__file__).resolve().parents[2] / "bench" / "results" / "gemm_calibration.json"
CAL = json.loads(CALIBRATION.read_text())
H100, H200 = CAL["h100_2026-11-22"], CAL["h200_2026-11-30"]
TOL = 0.10
M_GRID = (2048, 8192, 32768)  # the measured M range is 2048..32768
KN_GRID = (256, 512, 1024, 2048, 4096)


def _rounding(low: float, high: float) -> tuple[float, float]:
    """A figure stated to one decimal covers +-0.05 around it."""
    return low - 0.05, high + 0.05


def _within(x: float, low: float, high: float) -> bool:
    lo, hi = _rounding(low, high)
    return lo * (1 - TOL) <= x <= hi * (1 + TOL)


def _band(bands: list[dict], m: int, kn: int) -> dict | None:
    for b in bands:
        exc = b.get("except")
        if exc and exc["m"][0] <= m <= exc["m"][1] and exc["kn"][0] <= kn <= exc["kn"][1]:
            continue
        if b["m"][0] <= m <= b["m"][1] and b["kn"][0] <= kn <= b["kn"][1]:
            return b
    return None


def _points(key: str, ratio, misses: dict) -> list:
    """(m, kn, band) for every grid point a measured band covers; the model's known misses xfail."""
    out = []
    for m in M_GRID:
        for kn in KN_GRID:
            band = _band(H100[key], m, kn)
            if band is None:
                continue
            marks = []
            if (m, kn) in misses:
                marks = [pytest.mark.xfail(strict=True, reason=f"model {ratio(m, kn):.2f}x vs measured "
                                                               f"{band['as_stated']}: {misses[(m, kn)]}")]
            out.append(pytest.param(m, kn, band, id=f"M{m}-KN{kn}", marks=marks))
    return out


def prequantized_ratio(m: int, kn: int) -> float:
    return bf16_us(m, kn, kn) / fp8_gemm_us(m, kn, kn)


def per_call_ratio(m: int, kn: int, dev: DeviceModel = H100_SXM) -> float:
    return bf16_us(m, kn, kn, dev) / kernel_us("scaled_mm", "tensorwise", "fprop", m, kn, kn, dev)


PREQUANT_MISSES: dict = {}
PER_CALL_MISSES = {(8192, 4096): "same FLOPs as M=32768 K=N=2048, which measured a win with more bytes to cast: "
                                 "the model cannot have both (see loka/kernels/costmodel.py)"}


def test_constants_are_the_measured_ceilings():
    c = H100["ceilings"]
    assert (H100_SXM.bf16_tflops, H100_SXM.fp8_tflops, H100_SXM.hbm_tbps) == (
        c["bf16_tflops"], c["fp8_tflops"], c["copy_tbps"])


def test_model_reproduces_the_ceilings_at_their_shape():
    """At 8192^3 the model adds the operands' traffic to the FLOP time: within 12% below the ceiling."""
    m, k, n = H100["ceilings"]["shape"]
    flops = 2 * m * k * n
    bf16 = flops / bf16_us(m, k, n) / 1e6
    fp8 = flops / fp8_gemm_us(m, k, n) / 1e6
    assert 0.88 * H100["ceilings"]["bf16_tflops"] <= bf16 <= H100["ceilings"]["bf16_tflops"]
    assert 0.88 * H100["ceilings"]["fp8_tflops"] <= fp8 <= H100["ceilings"]["fp8_tflops"]


@pytest.mark.parametrize("m,kn,band", _points("prequantized_speedup", prequantized_ratio, PREQUANT_MISSES))
def test_prequantized_speedup_matches_h100(m, kn, band):
    r = prequantized_ratio(m, kn)
    assert _within(r, band["low"], band["high"]), f"M={m} K=N={kn}: model {r:.3f}x, measured {band['as_stated']}"


@pytest.mark.parametrize("m,kn,band", _points("per_call_quantized_speedup", per_call_ratio, PER_CALL_MISSES))
def test_per_call_quantized_speedup_matches_h100(m, kn, band):
    r = per_call_ratio(m, kn)
    wins = band["low"] > 1
    # "slower than bf16" is the claim that decides plans: below 1.0, and not below the stated floor.
    ok = _within(r, band["low"], band["high"]) if wins else band["low"] * (1 - TOL) <= r < 1.0
    assert ok, f"M={m} K=N={kn}: model {r:.3f}x, measured {band['as_stated']}"


def _h200_rows() -> list[dict]:
    cols = H200["columns"]
    return [dict(zip(cols, row)) for row in H200["median_ms"]]


def _h200_ids() -> list[str]:
    return [f"{r['m']}x{r['k']}x{r['n']}" for r in _h200_rows()]


H200_MISSES: dict = {}


@pytest.mark.parametrize("row", [pytest.param(r, id=i, marks=[pytest.mark.xfail(strict=True, reason=H200_MISSES[i])]
                                              if i in H200_MISSES else []) for r, i in zip(_h200_rows(), _h200_ids())])
def test_fastest_kernel_matches_the_h200_run(row):
    """The plan keeps the fastest: the model's fastest of bf16 / scaled_mm / fused Triton is the measured one.

    scaled_mm is timed with its quantization compiled (the model's default, ``compiled=True``).
    """
    m, k, n = row["m"], row["k"], row["n"]
    measured = {"bf16": row["bf16"], "scaled_mm": row["scaled_mm_quant_compiled"], "triton": row["triton_fused"]}
    model = {"bf16": bf16_us(m, k, n, H200_SXM), "scaled_mm": kernel_us("scaled_mm", "rowwise", "fprop", m, k, n, H200_SXM),
             "triton": kernel_us("triton", "rowwise", "fprop", m, k, n, H200_SXM)}
    assert min(model, key=model.get) == min(measured, key=measured.get), (model, measured)


def test_fused_quantization_beats_separate_at_small_shapes():
    """Measured on the H200: the fused Triton GEMM beats scaled_mm with an eager per-call cast at K,N <= 1024."""
    for row in _h200_rows():
        if row["m"] == 8192 and row["k"] <= 1024:
            assert row["triton_fused"] < row["scaled_mm_quant"]  # the record says so
            fused = kernel_us("triton", "rowwise", "fprop", 8192, row["k"], row["n"], H200_SXM)
            separate = kernel_us("scaled_mm", "rowwise", "fprop", 8192, row["k"], row["n"], H200_SXM, compiled=False)
            assert fused < separate


H200_FIT_FACTOR = 1.5  # the fit's stated worst case (loka/kernels/costmodel.py)


@pytest.mark.parametrize("row", _h200_rows(), ids=_h200_ids())
def test_h200_fit_times_within_its_stated_factor(row):
    """Every measured column of the H200 run, modelled within a factor 1.5 (the docstring's claim)."""
    m, k, n = row["m"], row["k"], row["n"]
    model_ms = {
        "bf16": bf16_us(m, k, n, H200_SXM),
        "scaled_mm_quant": kernel_us("scaled_mm", "rowwise", "fprop", m, k, n, H200_SXM, compiled=False),
        "scaled_mm_quant_compiled": kernel_us("scaled_mm", "rowwise", "fprop", m, k, n, H200_SXM),
        "scaled_mm_ceiling": fp8_gemm_us(m, k, n, H200_SXM),
        "triton_fused": kernel_us("triton", "rowwise", "fprop", m, k, n, H200_SXM),
    }
    for col, us in model_ms.items():
        ratio = us / 1e3 / row[col]
        assert 1 / H200_FIT_FACTOR <= ratio <= H200_FIT_FACTOR, f"{col}: model {us / 1e3:.4f} ms vs measured {row[col]} ms"


def test_h200_model_says_the_triton_kernel_loses():
    """The measured reason it left the default candidates: slower than bf16 at every recorded shape."""
    for row in _h200_rows():
        assert kernel_us("triton", "rowwise", "fprop", row["m"], row["k"], row["n"], H200_SXM) > bf16_us(
            row["m"], row["k"], row["n"], H200_SXM)


def test_producer_cast_and_cached_weight_reach_the_prequantized_ceiling():
    """With a quantized in its producer and b cached, scaled_mm costs its pre-quantized GEMM, which the H200
    measured faster than bf16 at 8192x4096x4096 and 32768x1024x1024 (the issue's premise)."""
    for row in _h200_rows():
        m, k, n = row["m"], row["k"], row["n"]
        fused = kernel_us("scaled_mm", "rowwise", "fprop", m, k, n, H200_SXM, a_in_producer=True, b_cached=True)
        assert fused == pytest.approx(fp8_gemm_us(m, k, n, H200_SXM))
        assert fused < kernel_us("scaled_mm", "rowwise", "fprop", m, k, n, H200_SXM)
        measured_wins = row["scaled_mm_ceiling"] < row["bf16"]
        assert (fused < bf16_us(m, k, n, H200_SXM)) == measured_wins, (m, k, n)


def test_delayed_scaling_skips_the_amax_pass():
    assert quantize_us(8192, 1024, amax_pass=False) < quantize_us(8192, 1024)
    assert kernel_us("scaled_mm", "tensorwise-delayed", "fprop", 8192, 1024, 1024) < kernel_us(
        "scaled_mm", "tensorwise", "fprop", 8192, 1024, 1024
    )


def test_timings_entry_shape_and_labels():
    t = time_site((4096, 256, 512), ["rowwise", "rowwise_with_gw_hp"], model=H100_SXM,
                  kernels=["scaled_mm", "triton"]).to_dict()
    assert t["source"] == "model" and t["representative"] is False
    assert set(t["bf16_ms"]) == {"fprop", "dgrad", "wgrad"}
    wgrad_hp = [e for e in t["entries"] if e["gemm"] == "wgrad" and e["recipe"] == "rowwise_with_gw_hp"]
    assert all(abs(e["median_ms"] - t["bf16_ms"]["wgrad"]) < 1e-12 for e in wgrad_hp)  # hp wgrad costs bf16 time
    assert len(t["entries"]) == 3 * 2 * 2
    # fprop of [M,K]·[N,K]ᵀ, dgrad [M,N]·[K,N]ᵀ, wgrad [N,M]·[K,M]ᵀ: the bf16 times follow the GEMMs' shapes
    assert t["bf16_ms"]["fprop"] == pytest.approx(bf16_us(4096, 256, 512) / 1e3)
    assert t["bf16_ms"]["dgrad"] == pytest.approx(bf16_us(4096, 512, 256) / 1e3)
    assert t["bf16_ms"]["wgrad"] == pytest.approx(bf16_us(512, 4096, 256) / 1e3)


def test_bad_device_model():
    with pytest.raises(ValueError, match="fused_efficiency"):
        DeviceModel("x", 1, 1, 1, fused_efficiency=0)
    with pytest.raises(ValueError, match="bf16_tflops"):
        DeviceModel("x", 0, 1, 1)


def test_plan_on_modelled_timings_says_they_are_predicted():
    from dispatch_report_fixtures import report, site

    from loka.dispatch import plan
    from loka.dispatch.microbench import model_timings

    rep = report(site("a", 256, 512, m=8192))
    p = plan(rep, timings=model_timings(rep, ["scaled_mm"]), progress=False)
    assert p.device["source"] == "model"
    assert any("speed model" in n for n in p.notes) and not any("(CPU)" in n for n in p.notes)
    assert "**predicted**" in p.summary()


# Measured on one H200, 2026-11-30 (bench/gemm_triton.py, CUDA events, M x K x N: bf16 ms, scaled_mm ms
# on pre-quantized operands): the H200 model's ceilings come from the last two columns' large shapes.
H200_MEASURED = {(8192, 256, 256): (0.0190, 0.0213), (8192, 512, 512): (0.0225, 0.0264),
                 (8192, 1024, 1024): (0.0273, 0.0320), (8192, 4096, 4096): (0.3434, 0.2032),
                 (32768, 1024, 1024): (0.0965, 0.0668)}


def test_h200_model_against_the_h200_measurements():
    for (m, k, n), (bf16_ms, fp8_ms) in H200_MEASURED.items():
        model = bf16_us(m, k, n, H200_SXM) / fp8_gemm_us(m, k, n, H200_SXM)
        measured = bf16_ms / fp8_ms
        if k >= 4096 or m >= 32768:  # compute-bound: the model follows the measured ratio
            assert model == pytest.approx(measured, rel=0.1), (m, k, n)
        else:  # launch-bound in that run: the model is off by up to ~0.5x there (see costmodel.H200_SXM)
            assert abs(model - measured) <= 0.5, (m, k, n)
    # the two compute-bound shapes it was fitted to (peak and K/(K + k_half) efficiency): their times
    for shape in ((8192, 4096, 4096), (32768, 1024, 1024)):
        bf16_ms, fp8_ms = H200_MEASURED[shape]
        assert bf16_us(*shape, H200_SXM) * 1e-3 == pytest.approx(bf16_ms, rel=0.02), shape
        assert fp8_gemm_us(*shape, H200_SXM) * 1e-3 == pytest.approx(fp8_ms, rel=0.02), shape
    # per-call quantization still loses at ranker shapes on the H200 model
    assert bf16_us(8192, 512, 512, H200_SXM) / kernel_us("scaled_mm", "tensorwise", "fprop", 8192, 512, 512, H200_SXM) < 0.6
