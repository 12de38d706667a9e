"""A plan's predicted training-step speed-up, from its GEMM times and a measured bf16 step.

A plan knows the time of every GEMM it planned (bf16 and chosen kernel, quantization
included) but not the rest of a step (embeddings, norms, the optimizer, data), which
FP8 does not speed up. Given the measured bf16 step time, the planned step is that
time minus the GEMM time the plan saves (Amdahl):

    planned_step = bf16_step - (Σ bf16_ms - Σ planned_ms)        speed-up = bf16_step / planned_step

``bench/plan_time.py`` prints it beside the measured planned step (the issue's target:
within 15%). It assumes the plan's timings come from the device the step is measured on
(or a speed model of it); a saving larger than the step says they do not.
"""

from __future__ import annotations

import math
from dataclasses import replace

from loka.dispatch.plans import Plan


def predicted_step(plan: Plan, bf16_step_ms: float) -> dict:
    """``{bf16_step_ms, saved_ms, planned_step_ms, speedup}`` of ``plan`` for a measured bf16 step."""
    if not (isinstance(bf16_step_ms, (int, float)) and math.isfinite(bf16_step_ms) and bf16_step_ms > 0):
        raise ValueError(f"bf16_step_ms={bf16_step_ms!r} must be a finite time > 0 (the measured bf16 step, ms)")
    t = plan.totals()
    saved = float(t["saved_ms"])
    if saved >= bf16_step_ms:
        raise ValueError(f"the plan saves {saved:.4g} ms of GEMM time but the bf16 step takes {bf16_step_ms:.4g} ms: "
                         "its timings come from another device; plan with timings of the device the step runs on")
    planned = bf16_step_ms - saved
    return {"bf16_step_ms": float(bf16_step_ms), "saved_ms": saved, "planned_step_ms": planned,
            "speedup": bf16_step_ms / planned}


def prediction_error(predicted_speedup: float, measured_speedup: float) -> float:
    """Relative error of a predicted speed-up against the measured one (0.15 is the issue's bound)."""
    if not measured_speedup > 0:
        raise ValueError(f"measured_speedup={measured_speedup!r} must be > 0")
    return (predicted_speedup - measured_speedup) / measured_speedup


def with_predicted_step(plan: Plan, bf16_step_ms: float, source: str) -> Plan:
    """``plan`` stating its predicted training step for a bf16 step of ``bf16_step_ms`` (``source``:
    where that time comes from, e.g. "measured on NVIDIA H200, bench/ranker.py, 2026-12-01")."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("source must say where the bf16 step time comes from (device, command, date)")
    return replace(plan, step={**predicted_step(plan, bf16_step_ms), "source": source})
