"""pytest-benchmark: how long ``loka.dispatch.plan`` takes on a synthetic probe report.

    .venv/bin/pytest bench/test_bench_plan.py --benchmark-only -q

The report has ``n`` sites with random ranker-like shapes, errors, sensitivities and
timings for three FP8 kernels x two recipes (so no micro-benchmark runs: this is the
planner and its solver alone). Plan time is CPU work, so the sizes are the same with or
without a GPU; 500 sites is a large ranker.
"""

from __future__ import annotations

import random

import pytest

from loka.dispatch import Budget, plan

GEMMS = ("fprop", "dgrad", "wgrad")
KERNELS = ("scaled_mm", "torchao", "scaled_mm_fast_accum")
RECIPES = ("tensorwise", "rowwise")
WIDTHS = (128, 256, 512, 1024, 2048, 4096)


def _error(rng: random.Random) -> dict:
    hi = rng.uniform(0.02, 0.15)
    return {"mean": 0.8 * hi, "ci_lo": 0.6 * hi, "ci_hi": hi, "sqnr_db": 25.0, "n": 5, "threshold": 0.1,
            "verdict": "safe" if hi < 0.1 else "unsafe"}


def _site(i: int, rng: random.Random) -> dict:
    k, n, m = rng.choice(WIDTHS), rng.choice(WIDTHS), rng.choice((2048, 8192, 32768))
    bf16 = 1e-9 * 2 * m * k * n / 0.7  # ~700 TFLOP/s
    entries = [{"gemm": g, "kernel": kern, "recipe": r, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "iters": 20}
               for g in GEMMS for kern in KERNELS for r in RECIPES for ms in [bf16 * rng.uniform(0.5, 1.4)]]
    return {"fqn": f"interaction.layers.{i // 8}.site{i % 8}.proj", "in_features": k, "out_features": n,
            "m_values": [m], "errors": {r: {g: _error(rng) for g in GEMMS} for r in RECIPES},
            "sensitivity": {r: {"loss_ref": 1.0, "loss_fp8": 1.0, "loss_delta": 0.0,
                                "rel_loss_delta": rng.uniform(0, 2e-4)} for r in RECIPES},
            "timings": {"device_name": "synthetic", "representative": True, "m": m,
                        "bf16_ms": {g: bf16 for g in GEMMS}, "entries": entries}}


@pytest.mark.parametrize("n_sites", [20, 100, 500])
def test_plan_time(benchmark, n_sites):
    rng = random.Random()  # fresh shapes and numbers each run
    report = {"kind": "loka.probe.report", "schema_version": 1, "sites": [_site(i, rng) for i in range(n_sites)]}
    benchmark.extra_info["sites"] = n_sites
    p = benchmark.pedantic(lambda: plan(report, Budget(), progress=False), rounds=3, iterations=1)
    assert len(p.sites) == n_sites
    assert p.totals()["error_cost"] <= Budget().max_model_ne_delta * (1 + 1e-9)
