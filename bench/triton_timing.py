"""Timing and reporting helpers shared by bench/gemm_triton.py and bench/norm_quant.py.

Times come from loka's one timer (loka.timer.time_fn): CUDA events around each call
on GPU (after warm-up), summarized by the median and the 10th/90th percentiles; CPU
times (dry runs under the Triton interpreter) come from perf_counter and are marked
not representative. L2 is not flushed between calls, as in a model where a layer's
input was just written.
"""

from __future__ import annotations

import datetime
import sys
from typing import Callable

import torch

from loka.timer import Timing
from loka.timer import time_fn as _time_fn
from loka.timer import try_time as _try_time

__all__ = ["Timing", "cell", "environment_lines", "markdown_table", "median_or_none", "raise_recompile_limit",
           "ratio", "time_fn", "try_time"]


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50) -> Timing:
    """Time ``fn()`` per call on ``device`` with loka's one timer (:func:`loka.timer.time_fn`)."""
    return _time_fn(fn, warmup=warmup, iters=iters, device=device)


def try_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> Timing | str:
    """``time_fn`` or the reason the candidate cannot run here (reported in the table, not hidden)."""
    return _try_time(fn, warmup=warmup, iters=iters, device=device)


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
