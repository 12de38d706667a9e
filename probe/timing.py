"""Timing kernels at a site's real shape: is FP8 *fast* there?

:func:`time_fn` is the one timer loka uses (the dispatch package reuses it, adding an
on-disk cache). Its signature is stable::

    time_fn(fn, *, warmup=10, iters=50, device=None) -> Timing

On a CUDA device each call is bracketed by CUDA events after ``warmup`` untimed calls;
on CPU ``time.perf_counter`` is used and the result is flagged
``representative=False``: CPU timings say nothing about GPU speed, and reports say so.

:func:`time_site` times every available kernel that supports each candidate recipe for
each GEMM of a site, *including* the per-call quantization (dynamic scaling inside
``kernel.mm``), against the ``bf16`` kernel, on inputs drawn from the fitted operand
distributions (or standard normal when no fit is given).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from loka.kernels import KERNELS
from loka.probe.fit import Fit
from loka.recipe import GEMM_ROLES, GEMMS, HP_GEMM, Recipe, as_recipe, gemm_shape


@dataclass(frozen=True)
class Timing:
    """Per-call wall time of a function, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int
    device_name: str
    representative: bool  # False on CPU: not a measure of GPU speed

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    s = sorted(times_ms)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[0], q[-1]


def time_fn(fn: Callable[[], object], *, warmup: int = 10, iters: int = 50, device: torch.device | str | None = None) -> Timing:
    """Median / p10 / p90 per-call time of ``fn()`` over ``iters`` timed calls after ``warmup``.

    ``device`` (default cpu) says how to time: CUDA events on a CUDA device, perf_counter on CPU.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    dev = torch.device(device or "cpu")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    med, p10, p90 = _quantiles(times)
    return Timing(med, p10, p90, iters, device_name(dev), dev.type == "cuda")


def _operands(gemm: str, shape: tuple[int, int, int], fits: dict[str, Fit] | None, dtype, device, seed: int):
    """``a[M,K]``, ``b[N,K]`` of ``gemm`` drawn from the fits of their roles (or N(0,1))."""
    m, k, n = gemm_shape(gemm, *shape)
    a_role, b_role = GEMM_ROLES[gemm]

    def draw(role: str, rows: int, s: int) -> torch.Tensor:
        fit = (fits or {}).get(role)
        t = fit.sample((rows, k), seed=s) if fit is not None else torch.randn(rows, k, generator=torch.Generator().manual_seed(s))
        return t.to(device=device, dtype=dtype)

    return draw(a_role, m, seed), draw(b_role, n, seed + 1)


def time_site(
    shape: tuple[int, int, int],
    recipes: list[Recipe | str],
    *,
    kernels: list[str] | None = None,
    gemms: tuple[str, ...] = GEMMS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    fits: dict[str, Fit] | None = None,
    warmup: int = 5,
    iters: int = 20,
) -> dict:
    """Time a site ``y[M,N] = x[M,K] · W[N,K]ᵀ`` given as ``shape=(M, K, N)``.

    Returns the report's ``timings`` entry: ``{device_name, representative, m, dtype, bf16_ms: {gemm: ms},
    entries: [{gemm, kernel, recipe, median_ms, p10_ms, p90_ms, iters}]}``; ``bf16_ms`` is the hp
    kernel's time in ``dtype`` (the operands' dtype; bf16 on GPU). Kernels that are not
    available here or do not support a recipe/shape are skipped (listed under ``skipped``).
    """

    dev = torch.device(device or "cpu")
    names = kernels if kernels is not None else [k.name for k in KERNELS if not k.hp]
    bf16 = KERNELS.get("bf16")
    out = {"device_name": device_name(dev), "representative": dev.type == "cuda", "m": int(shape[0]),
           "dtype": str(dtype).replace("torch.", ""),
           "bf16_ms": {}, "entries": [], "skipped": {}}
    for gemm in gemms:
        a, b = _operands(gemm, shape, fits, dtype, dev, seed=len(out["entries"]))
        t = time_fn(lambda: bf16.mm(a, b, HP_GEMM, out_dtype=dtype), warmup=warmup, iters=iters, device=dev)
        out["bf16_ms"][gemm] = t.median_ms
        for recipe in (as_recipe(r) for r in recipes):
            g = recipe.gemm(gemm)
            for name in names:
                kernel = KERNELS.get(name)
                ok, why = kernel.available(dev)
                if ok:
                    ok, why = kernel.supports(g, gemm_shape(gemm, *shape), dtype, dev)
                if not ok or g.is_hp:
                    out["skipped"][f"{gemm}/{name}/{recipe.name}"] = why or "hp GEMM"
                    continue
                t = time_fn(lambda: kernel.mm(a, b, g, out_dtype=dtype), warmup=warmup, iters=iters, device=dev)
                out["entries"].append({"gemm": gemm, "kernel": name, "recipe": recipe.name, "median_ms": t.median_ms,
                                       "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "iters": t.iters})
    return out
