"""Timing: CPU timings are flagged not representative; CUDA path uses events."""

import pytest
import torch

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
