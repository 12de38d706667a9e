"""Speed-model entries from published peaks (B200, MI300X, MI350X): labelled, and FP4 priced at its rate."""

from __future__ import annotations

import pytest

from loka.kernels.costmodel import DEVICE_MODELS, DeviceModel, kernel_us
from loka.probe.timing import time_site


@pytest.mark.parametrize("name", ["b200", "mi300x", "mi350x"])
def test_spec_entries_say_so_in_every_table(name):
    dev = DEVICE_MODELS[name]
    assert "spec, not measured" in dev.name
    t = time_site((8192, 4096, 4096), ["tensorwise"], model=dev, kernels=["scaled_mm"]).to_dict()
    assert "spec, not measured" in t["device_name"] and t["source"] == "model" and not t["representative"]


def test_fp4_runs_at_the_fp4_rate_where_the_device_has_one():
    shape = (32768, 8192, 8192)  # compute-bound: the peak decides
    b200, mi300x = DEVICE_MODELS["b200"], DEVICE_MODELS["mi300x"]
    fp8, fp4 = (kernel_us("scaled_mm", r, "fprop", *shape, b200) for r in ("mxfp8", "nvfp4"))
    assert fp4 < 0.75 * fp8  # twice the peak, half the bytes; the casts are the same passes
    fp8_mi, fp4_mi = (kernel_us("scaled_mm", r, "fprop", *shape, mi300x) for r in ("mxfp8", "nvfp4"))
    assert fp4_mi == pytest.approx(fp8_mi, rel=0.05)  # no FP4 tensor cores: the FP8 rate
    assert kernel_us("bf16", "bf16", "fprop", *shape, b200) > fp8


def test_fp4_peak_is_validated():
    with pytest.raises(ValueError, match="fp4_tflops"):
        DeviceModel("x", bf16_tflops=1.0, fp8_tflops=2.0, hbm_tbps=1.0, fp4_tflops=-1.0)
