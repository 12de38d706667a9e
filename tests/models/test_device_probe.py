"""``loka probe`` / ``loka plan`` on the bundled ranker for a B200 and an MI300X, emulated on the CPU:
the report measures every recipe the GPU runs (FP8 and FP4 side by side), the plan only those."""

from __future__ import annotations

import json

import pytest

from loka.app.cli import main
from loka.devices import get_target
from loka.probe.report import ProbeReport
from loka.recipe import GEMMS

TINY = ["--size", "tiny", "--steps", "3", "--every", "1", "--batch-size", "32", "--no-sensitivity",
        "--include", "over.*"]


@pytest.mark.parametrize("device, expect", [("b200", {"mxfp8", "mxfp8_floor", "nvfp4", "nvfp4_sr"}),
                                            ("mi300x", {"tensorwise_fnuz", "rowwise_fnuz"})])
def test_probe_and_plan_for_a_gpu_not_at_hand(tmp_path, capsys, device, expect):
    target = get_target(device)
    out = tmp_path / "probe"
    assert main(["probe", *TINY, "--device", device, "--out", str(out)]) == 0
    report = ProbeReport.load(out / "probe_report.json")
    assert set(report.recipes()) == set(target.caps.recipes) and expect <= set(report.recipes())
    assert report.doc["meta"]["target"] == device
    text = capsys.readouterr()
    assert f"Target: {device} ({target.arch})" in text.out and "kernel timing skipped on CPU" in text.out
    for s in report.sites:  # every format's error per site, side by side
        assert set(s["errors"]) == set(target.caps.recipes)
        assert all(s["errors"]["nvfp4" if device == "b200" else "rowwise_fnuz"][g]["n"] > 0 for g in GEMMS)

    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--report", str(out / "probe_report.json"), "--device", device, "--out", str(plan_path)]) == 0
    doc = json.loads(plan_path.read_text())
    assert (doc["device"]["target"], doc["device"]["arch"]) == (device, target.arch)
    for s in doc["sites"]:
        for g in GEMMS:
            c = s["gemms"][g]
            assert c["recipe"] == "bf16" or target.caps.runs(c["recipe"]), c


def test_probe_refuses_recipes_the_gpu_does_not_run(tmp_path, capsys):
    assert main(["probe", *TINY, "--device", "mi300x", "--recipes", "nvfp4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nvfp4 do not run on mi300x (gfx942)" in err and len(err.strip().splitlines()) == 1
