"""Timing kernels at a site's real shape: is FP8 *fast* there?

:func:`time_fn` is loka's one timer, defined in :mod:`loka.timer` and re-exported here for
the probe's callers. Its signature is stable::

    time_fn(fn, *, warmup=10, iters=50, device=None) -> Timing

On a CUDA device each call is bracketed by CUDA events after ``warmup`` untimed calls;
on CPU ``time.perf_counter`` is used and the result is flagged
``representative=False``: CPU timings say nothing about GPU speed, and reports say so.

:func:`time_site` is loka's one site timing, used by the probe, the micro-benchmarks
(loka.dispatch.microbench adds an on-disk cache), the planner and the projections. It
returns a :class:`~loka.probe.site_timing.SiteTiming` from one of two sources:

- measured (``model=None``): every kernel times each candidate recipe's GEMMs with
  ``kernel.mm`` on hp inputs, *including* the per-call quantization, against the ``bf16``
  kernel, on inputs drawn from the fitted operand distributions (or N(0,1));
- modelled (``model=<DeviceModel>``): the speed model of that GPU prices the same GEMMs.

One set of rules decides what is timed (anything not timed is listed under ``skipped``
with why): the kernels named, else the default candidates (and, ``with_reference=True``,
the numerical reference first); a kernel that does not implement the GEMM is skipped; a
padded kernel at a shape its inner kernel takes as it is is skipped (it would run the same
GEMM); an hp GEMM of a recipe costs the bf16 time. Measured only: a kernel not available
on the device is skipped once, one that does not take the recipe at the shape per GEMM.
Modelled only: the reference is not priced (it has no speed on a GPU).
"""

from __future__ import annotations

from typing import Mapping

import torch
from loka.progress import progress_bar

from loka.kernels import KERNELS
from loka.kernels.costmodel import DeviceModel, bf16_us, is_extrapolated, kernel_us
from loka.kernels.kernel import default_candidates, reference_kernel
from loka.kernels.padded import kernel_by_name, needs_padding
from loka.probe.fit import Fit
from loka.probe.site_timing import KernelTime, SiteTiming
from loka.recipe import GEMM_ROLES, GEMMS, HP_GEMM, Recipe, as_recipe, gemm_shape
from loka.recipe_json import recipe_key
from loka.timer import Timing, device_name, time_fn

__all__ = ["SiteTiming", "Timing", "device_name", "dist_name", "time_fn", "time_site"]


def _draw(fit, rows: int, k: int, seed: int, dtype, device) -> torch.Tensor:
    """``[rows, k]`` from ``fit`` (a Fit or its dict), or N(0,1)."""
    if fit is not None:
        t = (fit if isinstance(fit, Fit) else Fit.from_dict(fit)).sample((rows, k), seed=seed)
    else:
        t = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    return t.to(device=device, dtype=dtype)


def _operands(gemm: str, shape, fits: Mapping | None, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``a[M,K]``, ``b[N,K]`` of ``gemm`` drawn from the fits of their roles."""
    m, k, n = gemm_shape(gemm, *shape)
    a_role, b_role = GEMM_ROLES[gemm]
    return (_draw((fits or {}).get(a_role), m, k, 1, dtype, device),
            _draw((fits or {}).get(b_role), n, k, 2, dtype, device))


def dist_name(fits: Mapping | None, gemm: str) -> str:
    """The input distribution of ``gemm``'s operands, as a cache key part."""
    parts = []
    for role in GEMM_ROLES[gemm]:
        f = (fits or {}).get(role)
        if f is None:
            parts.append("normal(0,1)")
        else:
            d = f.to_dict() if hasattr(f, "to_dict") else f
            parts.append(f"{d['family']}({','.join(f'{p:.3g}' for p in d['params'])})")
    return " x ".join(parts)


def _jobs(shape, recipes: list[Recipe], names: list[str], gemms, dtype, device, model, skipped: dict) -> list:
    """``(gemm, kernel, recipe)`` to time (recipe None: the bf16 baseline); the rest go to ``skipped``."""
    jobs = []
    for gemm in gemms:
        gshape = gemm_shape(gemm, *shape)
        jobs.append((gemm, KERNELS.get("bf16"), None))
        for recipe in recipes:
            g = recipe.gemm(gemm)
            for name in names:
                kernel, key = kernel_by_name(name), f"{gemm}/{name}/{recipe.name}"
                if model is not None and kernel.reference:
                    skipped[name] = "the numerical reference has no speed on a GPU: not modelled"
                    continue
                if gemm not in kernel.gemms:
                    skipped[key] = f"implements {sorted(kernel.gemms)} only"
                    continue
                if model is None and not g.is_hp:
                    ok, why = kernel.available(device)
                    if not ok:
                        skipped[name] = why  # once per kernel, not per GEMM and recipe
                        continue
                    ok, why = kernel.supports(g, gshape, dtype, device)
                    if not ok:
                        skipped[key] = why
                        continue
                if not g.is_hp and not needs_padding(kernel, g, gshape, dtype, device):
                    skipped[key] = "aligned shape: the unpadded kernel runs the same GEMM"
                    continue
                jobs.append((gemm, kernel, recipe))
    return jobs


def time_site(
    shape: tuple[int, int, int],
    recipes: list[Recipe | str],
    *,
    model: DeviceModel | None = None,
    kernels: list[str] | None = None,
    with_reference: bool = False,
    gemms: tuple[str, ...] = GEMMS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    fits: Mapping | None = None,
    warmup: int = 5,
    iters: int = 20,
    cache=None,
    refresh: bool = False,
    progress: bool = False,
) -> SiteTiming:
    """Time a site ``y[M,N] = x[M,K] · W[N,K]ᵀ`` given as ``shape=(M, K, N)`` (module doc for the rules).

    ``model``: price it with that GPU's speed model instead of measuring here. ``cache``: a
    :class:`loka.dispatch.microbench.MicrobenchCache` to reuse measurements from (``refresh``
    re-measures). ``bf16_ms`` is the hp kernel's time in ``dtype`` (the operands' dtype).
    """
    dev = torch.device(device or "cpu")
    names = kernels if kernels is not None else [
        *([reference_kernel().name] if with_reference else []), *default_candidates()]
    skipped: dict[str, str] = {}
    jobs = _jobs(shape, [as_recipe(r) for r in recipes], names, gemms, dtype, dev, model, skipped)
    bf16_ms: dict[str, float] = {}
    entries: list[KernelTime] = []
    operands: dict[str, tuple] = {}
    bar = progress_bar(jobs, desc=f"timing M={shape[0]} K={shape[1]} N={shape[2]}", disable=not progress, leave=False)
    for gemm, kernel, recipe in bar:
        gshape = gemm_shape(gemm, *shape)
        cached = extrapolated = None
        if model is not None:  # the model's time, and whether it lies outside the measured region
            extrapolated = is_extrapolated(model, kernel.name, *gshape) or is_extrapolated(model, "bf16", *gshape)
        if recipe is not None and recipe.gemm(gemm).is_hp:  # the recipe keeps this GEMM in hp: bf16's time
            t = bf16_ms[gemm]
            entries.append(KernelTime(gemm, kernel.name, recipe.name, t, t, t, 0, False if cache is not None else None,
                                      extrapolated))
            continue
        if model is not None:
            ms = (kernel_us(kernel.name, recipe, gemm, *gshape, model) if recipe else bf16_us(*gshape, model)) / 1e3
            timing = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "iters": 0}
        else:
            timing, cached = _measure(gemm, kernel, recipe, shape, operands, fits, dtype, dev, warmup, iters,
                                      cache, refresh)
        if recipe is None:
            bf16_ms[gemm] = timing["median_ms"]
        else:
            entries.append(KernelTime(gemm, kernel.name, recipe.name, timing["median_ms"], timing["p10_ms"],
                                      timing["p90_ms"], timing["iters"], cached, extrapolated))
    if cache is not None:
        cache.save()
    if model is not None:
        return SiteTiming(model.name, False, int(shape[0]), bf16_ms, tuple(entries), skipped, "model")
    return SiteTiming(device_name(dev), dev.type == "cuda", int(shape[0]), bf16_ms, tuple(entries), skipped,
                      "measured", str(dtype).replace("torch.", ""))


def _measure(gemm, kernel, recipe, shape, operands, fits, dtype, dev, warmup, iters, cache, refresh):
    """``(timing dict, cached)`` of one job, from ``cache`` unless ``refresh``; cached is None without a cache."""
    gshape = gemm_shape(gemm, *shape)
    key = None if cache is None else cache.key(kernel, gemm, gshape, dtype, recipe_key(recipe) if recipe else "hp",
                                               dist_name(fits, gemm))
    timing = None if key is None or refresh else cache.get(key)
    if timing is not None:
        return timing, True
    if gemm not in operands:
        operands[gemm] = _operands(gemm, shape, fits, dtype, dev)
    a, b = operands[gemm]
    g = recipe.gemm(gemm) if recipe is not None else HP_GEMM
    t = time_fn(lambda: kernel.mm(a, b, g, out_dtype=dtype), warmup=warmup, iters=iters, device=dev)
    timing = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "iters": t.iters,
              "representative": t.representative}
    if cache is not None:
        cache.put(key, timing)
    return timing, None if cache is None else False
