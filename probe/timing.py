"""Timing kernels at a site's real shape: is FP8 *fast* there?

:func:`time_fn` is loka's one timer, defined in :mod:`loka.timer` and re-exported here for
the probe's callers (the dispatch package reuses it too, adding an on-disk cache). Its
signature is stable::

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

import torch

from loka.kernels import KERNELS
from loka.kernels.kernel import default_candidates
from loka.kernels.padded import needs_padding
from loka.probe.fit import Fit
from loka.recipe import GEMM_ROLES, GEMMS, HP_GEMM, Recipe, as_recipe, gemm_shape
from loka.timer import Timing, device_name, time_fn

__all__ = ["Timing", "device_name", "time_fn", "time_site"]


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
    names = kernels if kernels is not None else ["emulated", *default_candidates()]
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
                if ok and not needs_padding(kernel, g, gemm_shape(gemm, *shape), dtype, dev):
                    ok, why = False, "aligned shape: the unpadded kernel runs the same GEMM"
                if not ok or g.is_hp:
                    out["skipped"][f"{gemm}/{name}/{recipe.name}"] = why or "hp GEMM"
                    continue
                t = time_fn(lambda: kernel.mm(a, b, g, out_dtype=dtype), warmup=warmup, iters=iters, device=dev)
                out["entries"].append({"gemm": gemm, "kernel": name, "recipe": recipe.name, "median_ms": t.median_ms,
                                       "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "iters": t.iters})
    return out
