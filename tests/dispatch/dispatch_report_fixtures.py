"""Hand-built probe-report documents for planner tests (the fields the planner reads)."""

from __future__ import annotations

GEMMS = ("fprop", "dgrad", "wgrad")


def gemm_error(ci_hi: float, mean: float | None = None, n: int = 5) -> dict:
    mean = ci_hi * 0.8 if mean is None else mean
    return {"mean": mean, "ci_lo": mean * 0.8, "ci_hi": ci_hi, "sqnr_db": 20.0, "n": n, "threshold": 0.1,
            "verdict": "safe"}


def site(fqn, k, n, m=256, errors=None, bf16_ms=None, entries=(), sensitivity=None, device="test-gpu",
         representative=True) -> dict:
    """A report site; ``errors``: {recipe: {gemm: ci_hi}}; ``entries``: (gemm, kernel, recipe, ms)."""
    errors = errors or {"rowwise": {g: 0.05 for g in GEMMS}}
    timings = None
    if bf16_ms is not None:
        timings = {"device_name": device, "representative": representative, "m": m,
                   "bf16_ms": {g: bf16_ms for g in GEMMS} if isinstance(bf16_ms, float) else dict(bf16_ms),
                   "entries": [{"gemm": g, "kernel": kn, "recipe": r, "median_ms": ms, "p10_ms": ms, "p90_ms": ms,
                                "iters": 10} for g, kn, r, ms in entries]}
    return {
        "fqn": fqn, "in_features": k, "out_features": n, "m_values": [m],
        "errors": {r: {g: gemm_error(v) for g, v in per.items()} for r, per in errors.items()},
        "sensitivity": {r: {"loss_ref": 1.0, "loss_fp8": 1.0, "loss_delta": 0.0, "rel_loss_delta": v}
                        for r, v in (sensitivity or {}).items()},
        "timings": timings,
    }


def report(*sites) -> dict:
    return {"kind": "loka.probe.report", "schema_version": 1, "sites": list(sites)}
