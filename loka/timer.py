"""The one timer in loka: per-call time of a function on CPU or a CUDA device.

Everything that times code (the probe's site timings, dispatch's micro-benchmarks, the
bench scripts, ``bench/gpu_check.py``) goes through :func:`time_fn`, so every figure
loka prints was taken the same way. Its stable signature::

    time_fn(fn, *, warmup=10, iters=50, device=None) -> Timing

How it times, and why:

- **CPU** (``device`` None or cpu): ``time.perf_counter`` around each sample; the result is
  flagged ``representative=False``: CPU timings say nothing about GPU speed.
- **CUDA, per call** (default): one pair of CUDA events around each sample. Right for
  anything that runs well past the launch overhead (a training step, a large GEMM).
- **CUDA, small kernels** (``calls > 1`` and/or ``cuda_graph=True``): one event pair around
  ``calls`` back-to-back calls, divided by ``calls``. With ``cuda_graph=True`` the ``calls``
  calls are captured once in a CUDA graph and each sample is one replay, so neither Python
  nor the launch path sits between kernels. Without it, a kernel that finishes before the
  next launch is issued (bf16 at 8192x256x256: ~19 µs per Python call on an H200, most of it
  launch overhead) is timed as the launch path, not the kernel. A fn that cannot be captured
  (host synchronisation, CPU-side checks on device values, allocator-unfriendly code) falls
  back to back-to-back calls per event pair; ``Timing.note`` says why.

Never queries CUDA at import time.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

PERF_COUNTER = "perf_counter"
CUDA_EVENTS = "cuda_events"
CUDA_GRAPH = "cuda_graph"


@dataclass(frozen=True)
class Timing:
    """Per-call time of a function, in milliseconds: median and 10th/90th percentiles.

    ``iters`` samples were taken; each sample covered ``calls`` back-to-back calls (the
    per-call figures are divided by it). ``method`` is how the samples were timed
    (``perf_counter``, ``cuda_events`` or ``cuda_graph``); ``note`` gives the reason when
    the asked-for method could not be used.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int
    device_name: str
    representative: bool  # False on CPU: not a measure of GPU speed
    method: str = PERF_COUNTER
    calls: int = 1
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def cell(self) -> str:
        """``median (p10-p90)`` in ms, as the bench tables print it."""
        return f"{self.median_ms:.4f} ({self.p10_ms:.4f}-{self.p90_ms:.4f})"


def device_name(device: torch.device | str) -> str:
    """A human name for ``device``: the GPU's name, or the CPU with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    """``(median, p10, p90)`` of ``times_ms`` (inclusive method: stays inside the samples)."""
    if not times_ms:
        raise ValueError("quantiles() needs at least one sample")
    s = sorted(times_ms)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[0], q[-1]


def _check_args(warmup: int, iters: int, calls: int) -> None:
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if calls < 1:
        raise ValueError(f"need calls >= 1 (back-to-back calls per timed sample), got calls={calls}")


def _time_cpu(fn: Callable[[], object], iters: int, calls: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return times


def _time_events(run: Callable[[], object], dev: torch.device, iters: int, calls: int) -> list[float]:
    """One event pair around each ``run()``; ``run`` covers ``calls`` calls."""
    torch.cuda.synchronize(dev)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize(dev)
    return [s.elapsed_time(e) / calls for s, e in events]


def _capture(fn: Callable[[], object], dev: torch.device, calls: int, warmup: int):
    """A CUDA graph of ``calls`` back-to-back ``fn()`` calls (warmed up on a side stream first,
    as capture requires), or the reason it could not be made."""
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 2)):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()  # one untimed replay: first replay uploads the graph
        torch.cuda.synchronize(dev)
        return graph, ""
    except Exception as exc:  # any capture failure falls back, with the reason kept
        try:
            torch.cuda.synchronize(dev)
        except Exception:  # noqa: BLE001 - the fallback itself reports the state
            pass
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return None, f"CUDA graph capture failed ({type(exc).__name__}: {first})"


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    iters: int = 50,
    device: torch.device | str | None = None,
    calls: int = 1,
    cuda_graph: bool = False,
) -> Timing:
    """Median / p10 / p90 per-call time of ``fn()`` over ``iters`` samples after ``warmup`` calls.

    ``device`` (default cpu) says how to time (see the module docstring). ``calls`` is the
    number of back-to-back calls per timed sample; ``cuda_graph=True`` captures those calls
    in a CUDA graph and times its replays (on CPU, or when capture fails, the fallback is
    recorded in ``Timing.note``).
    """
    _check_args(warmup, iters, calls)
    dev = torch.device(device or "cpu")
    for _ in range(warmup):
        fn()
    note, method = "", PERF_COUNTER
    if dev.type != "cuda":
        if cuda_graph:
            note = f"CUDA graphs need a CUDA device; timed with perf_counter on {dev.type}"
        times = _time_cpu(fn, iters, calls)
    else:
        graph = None
        if cuda_graph:
            graph, note = _capture(fn, dev, calls, warmup)
            if graph is None:
                note += f"; timed {calls} back-to-back calls per CUDA event pair instead"
        if graph is not None:
            method, times = CUDA_GRAPH, _time_events(graph.replay, dev, iters, calls)
        else:
            def run() -> None:
                for _ in range(calls):
                    fn()

            method, times = CUDA_EVENTS, _time_events(run, dev, iters, calls)
    med, p10, p90 = quantiles(times)
    return Timing(med, p10, p90, iters, device_name(dev), dev.type == "cuda", method, calls, note)


def try_time(fn: Callable[[], object], **kwargs) -> Timing | str:
    """:func:`time_fn`, or the reason ``fn`` cannot run here (a table cell, not a crash)."""
    try:
        return time_fn(fn, **kwargs)
    except Exception as exc:  # a candidate that fails is reported, not hidden
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"n/a: {type(exc).__name__}: {first[:80]}"
