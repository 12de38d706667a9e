"""Timing: CPU timings are flagged not representative; CUDA path uses events; one site timing, two sources."""

import json

import pytest
import torch

from loka.kernels.costmodel import H100_SXM
from loka.probe.site_timing import SiteTiming
from loka.probe.timing import Timing, time_fn, time_site


def test_time_fn_on_cpu():
    calls = []
    t = time_fn(lambda: calls.append(torch.randn(32, 32) @ torch.randn(32, 32)), warmup=2, iters=7)
    assert isinstance(t, Timing) and len(calls) == 9 and t.iters == 7
    assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms
    assert t.representative is False and t.device_name.startswith("cpu")
    with pytest.raises(ValueError, match="iters"):
        time_fn(lambda: None, iters=0)


def test_time_site_times_available_kernels_with_quantization_vs_bf16():
    r = time_site((48, 32, 64), ["rowwise", "blockwise"], kernels=["emulated", "scaled_mm"], warmup=1, iters=2).to_dict()
    assert set(r["bf16_ms"]) == {"fprop", "dgrad", "wgrad"} and r["representative"] is False
    got = {(e["gemm"], e["kernel"], e["recipe"]) for e in r["entries"]}
    assert ("fprop", "emulated", "rowwise") in got and ("wgrad", "emulated", "blockwise") in got
    # scaled_mm does not take blockwise: skipped with its reason, never silently dropped.
    assert any("blockwise" in k and "scaled_mm" in k for k in r["skipped"])
    assert all(e["median_ms"] > 0 for e in r["entries"])


@pytest.mark.requires_cuda
def test_time_fn_cuda_events():
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    t = time_fn(lambda: a @ a, warmup=3, iters=10, device="cuda")
    assert t.representative and 0 < t.p10_ms <= t.median_ms <= t.p90_ms


@pytest.mark.requires_sm89
def test_time_site_on_fp8_gpu_has_scaled_mm():
    r = time_site((1024, 512, 512), ["rowwise"], device="cuda", warmup=3, iters=10).to_dict()
    assert any(e["kernel"] == "scaled_mm" for e in r["entries"]) and r["representative"]


def test_site_timing_round_trips_the_report_json_and_refuses_a_malformed_one():
    t = time_site((48, 32, 64), ["rowwise", "rowwise_with_gw_hp"], kernels=["emulated"], dtype=torch.float32,
                  warmup=0, iters=1)
    d = json.loads(json.dumps(t.to_dict()))
    assert SiteTiming.from_dict(d) == t and t.source == "measured" and "source" not in d  # the report's schema
    assert {e.kernel for e in t.emulated} == {"emulated"}  # what ran on the reference, not FP8 hardware
    hp_wgrad = [e for e in t.entries if e.recipe == "rowwise_with_gw_hp" and e.gemm == "wgrad"]
    assert hp_wgrad and all(e.median_ms == t.bf16_ms["wgrad"] for e in hp_wgrad)  # an hp GEMM costs bf16's time
    with pytest.raises(ValueError, match="malformed site timings.*re-time"):
        SiteTiming.from_dict({"bf16_ms": {"fprop": 1.0}, "entries": [{"gemm": "fprop"}]})
    with pytest.raises(ValueError, match="never representative"):
        SiteTiming("H100", True, 8, {"fprop": 1.0}, source="model")


def test_the_speed_model_source_follows_the_same_rules():
    t = time_site((32, 64, 48), ["rowwise"], model=H100_SXM, kernels=["emulated", "scaled_mm", "scaled_mm+pad"])
    assert t.source == "model" and not t.representative and t.to_dict()["source"] == "model"
    assert "not modelled" in t.skipped["emulated"]  # the reference has no GPU speed
    assert "aligned shape" in t.skipped["fprop/scaled_mm+pad/rowwise"]  # as measured: +pad only where needed
    assert {(e.gemm, e.kernel) for e in t.entries} == {(g, "scaled_mm") for g in ("fprop", "dgrad", "wgrad")}
    odd = time_site((32, 429, 557), ["rowwise"], model=H100_SXM, kernels=["scaled_mm+pad"])
    assert {e.kernel for e in odd.entries} == {"scaled_mm+pad"} and all(e.iters == 0 for e in odd.entries)
