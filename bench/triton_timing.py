"""Timing and reporting helpers shared by bench/gemm_triton.py and bench/norm_quant.py.

GPU times come from CUDA events around each call (after warm-up), summarized by
the median and the 10th/90th percentiles; CPU times (dry runs under the Triton
interpreter) come from perf_counter and are marked not representative. L2 is
not flushed between calls, as in a model where a layer's input was just written.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and 10th/90th percentiles over ``iters`` calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int

    def cell(self) -> str:
        return f"{self.median_ms:.4f} ({self.p10_ms:.4f}-{self.p90_ms:.4f})"


def _quantiles(samples: list[float]) -> Timing:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(s), pick(0.1), pick(0.9), len(s))


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50) -> Timing:
    """Time ``fn()`` per call on ``device`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return _quantiles(samples)
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def try_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> Timing | str:
    """``time_fn`` or the reason the candidate cannot run here (reported in the table, not hidden)."""
    try:
        return time_fn(fn, device, warmup, iters)
    except Exception as exc:  # a candidate that fails is a table cell, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"n/a: {type(exc).__name__}: {first[:80]}"


def environment_lines(device: torch.device, argv: list[str] | None = None) -> list[str]:
    """Markdown lines saying where and how the figures were taken."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        where = f"{name} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}"
    else:
        where = "CPU, Triton interpreter: **timings are NOT representative** (dry run proving the script works)"
    return [
        f"- device: {where}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- command: `python {' '.join(argv if argv is not None else sys.argv)}`",
        "- times: ms per call, median (p10-p90) over "
        + ("CUDA-event-timed" if device.type == "cuda" else "perf_counter-timed")
        + " calls after warm-up; L2 not flushed",
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def median_or_none(t: Timing | str) -> float | None:
    return t.median_ms if isinstance(t, Timing) else None


def ratio(base: Timing | str, other: Timing | str) -> str:
    """``base / other`` as a speedup of ``other`` (``n/a`` if either did not run)."""
    b, o = median_or_none(base), median_or_none(other)
    return f"{b / o:.2f}x" if b and o else "n/a"


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo recompile per shape instead of silently falling back to eager
    (the timing pitfall in bench/results/h100_2026-11-22_gemm.md)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


def cell(t: Timing | str) -> str:
    return t.cell() if isinstance(t, Timing) else t
