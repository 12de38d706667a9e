"""bench/plan_time.py's CPU smoke mode: probe -> plan -> predicted beside measured, end to end."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_plan_time", ROOT / "bench" / "plan_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(text: str, label: str) -> tuple[float, float, float]:
    m = re.search(rf"\| {re.escape(label)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+)x \|", text)
    assert m, f"no row {label!r} in:\n{text}"
    return tuple(float(g) for g in m.groups())


@pytest.mark.slow
@pytest.mark.parametrize("speed_model", [None, "h200"])
def test_cpu_smoke_puts_prediction_beside_measurement(tmp_path, speed_model):
    out = tmp_path / "plan_time.md"
    argv = ["--cpu-smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--speed-model", speed_model] if speed_model else []
    assert _load().main(argv) == 0
    text = out.read_text()
    assert "NOT representative" in text and "target: within 15%" in text
    step_bf16, step_planned, step_speedup = _row(text, "predicted training step (measured bf16 step - plan's saving)")
    gemm_bf16, gemm_planned, _ = _row(text, "predicted GEMM time (plan)")
    meas_bf16, _, _ = _row(text, "measured training step")
    assert step_bf16 == pytest.approx(meas_bf16, abs=1e-4)  # the prediction starts from the measured bf16 step
    # Amdahl by hand: the step loses exactly the GEMM time the plan saves (4-decimal rounding in the table).
    assert step_planned == pytest.approx(step_bf16 - (gemm_bf16 - gemm_planned), abs=3e-4)
    assert step_speedup == pytest.approx(step_bf16 / step_planned, rel=2e-3)
    if speed_model:
        assert "speed model" in text
