"""On-device micro-benchmarks of every kernel for a site's GEMMs, cached on disk.

For a site ``y[M,N] = x[M,K] · W[N,K]ᵀ`` (M as seen by the probe, or a list of
M buckets for serving), every kernel that is available here and takes a
candidate recipe at each GEMM's shape is timed *including its quantization*
(``kernel.mm`` on high-precision inputs, dynamic scaling), next to ``bf16``,
with loka's one timer (``loka.timer.time_fn``: warm-up, CUDA events on
GPU, median and p10/p90). Inputs are drawn from the probe's fitted operand
distributions when given (ReLU-like activations and heavy-tailed gradients
make casts and amax passes behave differently than N(0,1) data).

Results are cached in a JSON file per device under ``cache_dir`` (default
``~/.cache/loka/microbench``), keyed by device name, driver/CUDA/torch and
kernel-library versions, GEMM shape, dtype, kernel, recipe and input
distribution; a later call reuses them, ``refresh=True`` re-measures.
CPU timings are flagged ``representative: false``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from loka.progress import progress_bar
from loka.kernels import KERNELS
from loka.kernels.kernel import default_candidates
from loka.kernels.costmodel import H100_SXM, DeviceModel, model_site_timings
from loka.probe.fit import Fit
from loka.probe.reader import report_sites
from loka.timer import device_name, time_fn
from loka.recipe import GEMM_ROLES, GEMMS, HP_GEMM, as_recipe, gemm_shape

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loka" / "microbench"


def device_key(device: torch.device) -> dict:
    """What identifies a machine for timing purposes."""
    info = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda, "driver": None}
    if device.type == "cuda" and hasattr(torch._C, "_cuda_getDriverVersion"):
        info["driver"] = torch._C._cuda_getDriverVersion()
    return info


class MicrobenchCache:
    """``{key: timing}`` in one JSON file per device; written atomically on ``save``."""

    def __init__(self, cache_dir: str | Path | None, device: torch.device) -> None:
        root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.device_info = device_key(device)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.device_info["device"])[:80]
        self.path = root / f"{slug}.json"
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.entries = {}  # a corrupt cache is re-measured, never trusted
        self.dirty = False
        self.hits = 0

    def key(self, kernel, gemm: str, shape, dtype, recipe: str, dist: str) -> str:
        parts = dict(self.device_info, lib=kernel.library_version(), kernel=kernel.name, gemm=gemm,
                     shape=list(shape), dtype=str(dtype), recipe=recipe, dist=dist)
        return json.dumps(parts, sort_keys=True)

    def get(self, key: str) -> dict | None:
        hit = self.entries.get(key)
        self.hits += hit is not None
        return hit

    def put(self, key: str, timing: dict) -> None:
        self.entries[key] = timing
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, sort_keys=True, indent=0))
        tmp.replace(self.path)
        self.dirty = False


def _draw(fit: dict | None, rows: int, k: int, seed: int, dtype, device) -> torch.Tensor:
    if fit is not None:
        t = (fit if isinstance(fit, Fit) else Fit.from_dict(fit)).sample((rows, k), seed=seed)
    else:
        t = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    return t.to(device=device, dtype=dtype)


def _dist_name(fits: dict | None, gemm: str) -> str:
    a_role, b_role = GEMM_ROLES[gemm]
    parts = []
    for role in (a_role, b_role):
        f = (fits or {}).get(role)
        if f is None:
            parts.append("normal(0,1)")
        else:
            d = f.to_dict() if hasattr(f, "to_dict") else f
            parts.append(f"{d['family']}({','.join(f'{p:.3g}' for p in d['params'])})")
    return " x ".join(parts)


def _jobs(shape, recipes, kernels, gemms, dtype, device, skipped):
    """(gemm, kernel, recipe name) triples to time; skipped ones recorded with the reason."""
    names = kernels if kernels is not None else default_candidates()
    jobs = []
    for gemm in gemms:
        gshape = gemm_shape(gemm, *shape)
        jobs.append((gemm, KERNELS.get("bf16"), None))
        for rname in recipes:
            g = as_recipe(rname).gemm(gemm)
            if g.is_hp:
                continue
            for name in names:
                kernel = KERNELS.get(name)
                if gemm not in kernel.gemms:
                    continue
                ok, why = kernel.available(device)
                if not ok:
                    skipped[name] = why  # once per kernel, not per GEMM and recipe
                    continue
                ok, why = kernel.supports(g, gshape, dtype, device)
                if ok:
                    jobs.append((gemm, kernel, rname))
                else:
                    skipped[f"{gemm}/{name}/{rname}"] = why
    return jobs


def time_site_cached(
    shape: tuple[int, int, int],
    recipes: list[str],
    *,
    kernels: list[str] | None = None,
    gemms: tuple[str, ...] = GEMMS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    fits: dict | None = None,
    warmup: int = 5,
    iters: int = 20,
    refresh: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Time a site given as ``shape=(M, K, N)``; returns the probe report's ``timings`` format.

    ``{device_name, representative, m, bf16_ms: {gemm: ms}, entries: [{gemm, kernel, recipe,
    median_ms, p10_ms, p90_ms, iters, cached}], skipped: {"kernel" or "gemm/kernel/recipe": reason}}``.
    """
    device = torch.device(device or "cpu")
    cache = MicrobenchCache(cache_dir, device)
    skipped: dict[str, str] = {}
    jobs = _jobs(shape, [as_recipe(r).name for r in recipes], kernels, gemms, dtype, device, skipped)
    out = {"device_name": cache.device_info["device"], "representative": device.type == "cuda", "m": int(shape[0]),
           "bf16_ms": {}, "entries": [], "skipped": skipped}
    operands: dict[str, tuple] = {}
    bar = progress_bar(jobs, desc=f"microbench M={shape[0]} K={shape[1]} N={shape[2]}", disable=not progress, leave=False)
    for gemm, kernel, rname in bar:
        gshape = gemm_shape(gemm, *shape)
        recipe = as_recipe(rname).gemm(gemm) if rname else HP_GEMM
        key = cache.key(kernel, gemm, gshape, dtype, rname or "hp", _dist_name(fits, gemm))
        timing = None if refresh else cache.get(key)
        cached = timing is not None
        if timing is None:
            if gemm not in operands:
                a_role, b_role = GEMM_ROLES[gemm]
                m, k, n = gshape
                operands[gemm] = (_draw((fits or {}).get(a_role), m, k, 1, dtype, device),
                                  _draw((fits or {}).get(b_role), n, k, 2, dtype, device))
            a, b = operands[gemm]
            t = time_fn(lambda: kernel.mm(a, b, recipe, out_dtype=dtype), warmup=warmup, iters=iters, device=device)
            timing = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "iters": t.iters,
                      "representative": t.representative}
            cache.put(key, timing)
        if rname is None:
            out["bf16_ms"][gemm] = timing["median_ms"]
        else:
            out["entries"].append({"gemm": gemm, "kernel": kernel.name, "recipe": rname, "cached": cached,
                                   **{k: timing[k] for k in ("median_ms", "p10_ms", "p90_ms", "iters")}})
    cache.save()
    return out


def time_serving_buckets(
    in_features: int, out_features: int, m_buckets: list[int], recipes: list[str], **kwargs
) -> dict[int, dict]:
    """fprop timings per declared serving batch size M (``{m: timings}``); kwargs as time_site_cached."""
    if not m_buckets or any(int(m) < 1 for m in m_buckets):
        raise ValueError(f"m_buckets={m_buckets!r} must be a non-empty list of batch sizes >= 1")
    return {int(m): time_site_cached((int(m), in_features, out_features), recipes, gemms=("fprop",), **kwargs)
            for m in sorted(set(m_buckets))}


def combine_buckets(per_bucket: dict[int, dict]) -> dict:
    """One timings entry for a serving site: fprop times summed over the M buckets.

    A kernel/recipe counts only if it was timed at every bucket (a kernel that cannot take
    one of the batch sizes cannot serve the site). ``m`` is the largest bucket.
    """
    ms = sorted(per_bucket)
    first = per_bucket[ms[0]]
    sums: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    for t in per_bucket.values():
        for e in t["entries"]:
            key = (e["gemm"], e["kernel"], e["recipe"])
            sums[key] = sums.get(key, 0.0) + e["median_ms"]
            counts[key] = counts.get(key, 0) + 1
    entries = [{"gemm": g, "kernel": k, "recipe": r, "median_ms": v, "p10_ms": v, "p90_ms": v, "iters": 0}
               for (g, k, r), v in sorted(sums.items()) if counts[(g, k, r)] == len(ms)]
    return {"device_name": first["device_name"], "representative": first["representative"], "m": ms[-1],
            "m_buckets": ms, "bf16_ms": {"fprop": sum(t["bf16_ms"]["fprop"] for t in per_bucket.values())},
            "entries": entries, "skipped": {k: v for t in per_bucket.values() for k, v in t["skipped"].items()}}


def model_timings(report, kernels: list[str], dev: DeviceModel = H100_SXM) -> dict:
    """``{fqn: timings}`` for every site of a probe report, for ``loka.dispatch.plan(timings=...)``.

    ``kernels`` are the FP8 kernels to predict (those the plan may choose on the
    machine that will run it); the planner still checks each one's ``supports``.
    """
    out = {}
    for site in report_sites(report):
        recipes = sorted(site.errors) or ["tensorwise", "rowwise"]
        out[site.fqn] = model_site_timings((site.m, site.in_features, site.out_features), recipes, kernels, dev)
    return out
