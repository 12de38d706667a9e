"""On-device micro-benchmarks of every kernel for a site's GEMMs, cached on disk.

The timing itself is loka's one site timing (``loka.probe.timing.time_site``, rules there);
this module adds its on-disk cache (``time_site(..., cache=open_cache(cache_dir, device))``),
serving buckets and the speed model's timings of a whole report. For a site
``y[M,N] = x[M,K] · W[N,K]ᵀ`` (M as seen by the probe, or a list of
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

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from loka.kernels.costmodel import H100_SXM, DeviceModel
from loka.probe.reader import report_recipes, report_sites
from loka.probe.site_timing import KernelTime, SiteTiming
from loka.probe.timing import time_site
from loka.timer import device_name

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


def open_cache(cache_dir: str | Path | None, device: torch.device | str | None) -> MicrobenchCache:
    """The micro-benchmark cache of ``device`` under ``cache_dir`` (default ``~/.cache/loka/microbench``)."""
    return MicrobenchCache(cache_dir, torch.device(device or "cpu"))


def time_serving_buckets(
    in_features: int, out_features: int, m_buckets: list[int], recipes: list[str], **kwargs
) -> dict[int, SiteTiming]:
    """fprop timings per declared serving batch size M (``{m: timings}``); kwargs as ``time_site``."""
    if not m_buckets or any(int(m) < 1 for m in m_buckets):
        raise ValueError(f"m_buckets={m_buckets!r} must be a non-empty list of batch sizes >= 1")
    return {int(m): time_site((int(m), in_features, out_features), recipes, gemms=("fprop",), **kwargs)
            for m in sorted(set(m_buckets))}


def combine_buckets(per_bucket: dict[int, SiteTiming]) -> SiteTiming:
    """One timings entry for a serving site: fprop times summed over the M buckets.

    A kernel/recipe counts only if it was timed at every bucket (a kernel that cannot take
    one of the batch sizes cannot serve the site). ``m`` is the largest bucket.
    """
    ms = sorted(per_bucket)
    first = per_bucket[ms[0]]
    sums: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    for t in per_bucket.values():
        for e in t.entries:
            key = (e.gemm, e.kernel, e.recipe)
            sums[key] = sums.get(key, 0.0) + e.median_ms
            counts[key] = counts.get(key, 0) + 1
    entries = tuple(KernelTime(g, k, r, v, v, v, 0) for (g, k, r), v in sorted(sums.items()) if counts[(g, k, r)] == len(ms))
    return dataclasses.replace(
        first, m=ms[-1], m_buckets=tuple(ms), bf16_ms={"fprop": sum(t.bf16_ms["fprop"] for t in per_bucket.values())},
        entries=entries, skipped={k: v for t in per_bucket.values() for k, v in t.skipped.items()})


def model_timings(report, kernels: list[str], dev: DeviceModel = H100_SXM) -> dict:
    """``{fqn: timings}`` for every site of a probe report, for ``loka.dispatch.plan(timings=...)``.

    ``kernels`` are the FP8 kernels to predict (those the plan may choose on the
    machine that will run it); the planner still checks each one's ``supports``.
    """
    out, known = {}, report_recipes(report)  # Recipe objects: hand-built ones from the report's fields
    for site in report_sites(report):
        recipes = [known[r] for r in sorted(site.errors) if r in known] or ["tensorwise", "rowwise"]
        out[site.fqn] = time_site((site.m, site.in_features, site.out_features), recipes, model=dev,
                                  kernels=kernels).to_dict()
    return out
