"""What one site's GEMMs cost per kernel and recipe, measured or modelled: :class:`SiteTiming`.

The probe, the micro-benchmarks, the planner and the projections all hand each other this one
typed result, made by :func:`loka.probe.timing.time_site` from one of two sources: ``measured``
(``kernel.mm`` timed on a device, quantization included) or ``model`` (the speed model of a GPU,
loka/kernels/costmodel.py). In a probe report or a plan's inputs it is the ``timings`` JSON
object; :meth:`SiteTiming.to_dict` writes exactly that schema and :meth:`SiteTiming.from_dict`
reads it back, refusing a malformed one in one line::

    {device_name, representative, [source: "model"], m, [m_buckets], dtype, bf16_ms: {gemm: ms},
     entries: [{gemm, kernel, recipe, [cached], median_ms, p10_ms, p90_ms, iters, [extrapolated]}],
     skipped: {"kernel" or "gemm/kernel/recipe": why}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from loka.kernels import KERNELS

Source = Literal["measured", "model"]
SOURCES = ("measured", "model")


@dataclass(frozen=True)
class KernelTime:
    """One kernel running one GEMM of one recipe at the site's shape (ms; ``iters=0``: modelled)."""

    gemm: str
    kernel: str
    recipe: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int = 0
    cached: bool | None = None  # measured: whether it came from the micro-benchmark cache
    extrapolated: bool | None = None  # modelled: outside the speed model's measured region (costmodel)

    def to_dict(self) -> dict:
        out = {"gemm": self.gemm, "kernel": self.kernel, "recipe": self.recipe}
        if self.cached is not None:
            out["cached"] = self.cached
        out.update(median_ms=self.median_ms, p10_ms=self.p10_ms, p90_ms=self.p90_ms, iters=self.iters)
        if self.extrapolated is not None:
            out["extrapolated"] = self.extrapolated
        return out


@dataclass(frozen=True)
class SiteTiming:
    """Per-GEMM bf16 time and per kernel/recipe/GEMM times of one site ``(M, K, N)``.

    ``entries`` include the reference kernel's where it was timed (see :attr:`emulated`);
    ``skipped`` says what was not timed and why (never silently dropped).
    """

    device_name: str
    representative: bool
    m: int
    bf16_ms: Mapping[str, float]
    entries: tuple[KernelTime, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)
    source: Source = "measured"
    dtype: str = "bfloat16"
    m_buckets: tuple[int, ...] | None = None  # serving: fprop summed over these batch sizes

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"SiteTiming.source={self.source!r} is not valid; use one of {SOURCES}")
        if self.source == "model" and self.representative:
            raise ValueError("a modelled SiteTiming is never representative of a measured device")

    @property
    def emulated(self) -> tuple[KernelTime, ...]:
        """The entries run by the numerical reference (quantize -> dequantize -> hp matmul), not FP8 hardware."""
        return tuple(e for e in self.entries if e.kernel in KERNELS and KERNELS.get(e.kernel).reference)

    def to_dict(self) -> dict:
        """The report's ``timings`` JSON object (module doc)."""
        out: dict = {"device_name": self.device_name, "representative": self.representative}
        if self.source == "model":
            out["source"] = "model"
        out["m"] = self.m
        if self.m_buckets is not None:
            out["m_buckets"] = list(self.m_buckets)
        return {**out, "dtype": self.dtype, "bf16_ms": dict(self.bf16_ms),
                "entries": [e.to_dict() for e in self.entries], "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SiteTiming":
        """Read a ``timings`` object (as written by :meth:`to_dict`, or by an older loka without the
        optional keys); ``ValueError`` naming the problem if it is malformed."""
        try:
            entries = tuple(KernelTime(str(e["gemm"]), str(e["kernel"]), str(e["recipe"]), float(e["median_ms"]),
                                       float(e.get("p10_ms", e["median_ms"])), float(e.get("p90_ms", e["median_ms"])),
                                       int(e.get("iters", 0)), e.get("cached"), e.get("extrapolated"))
                            for e in d["entries"])
            bf16 = {str(g): float(ms) for g, ms in d["bf16_ms"].items()}
            buckets = d.get("m_buckets")
            return cls(str(d.get("device_name", "unknown")), bool(d.get("representative", False)), int(d.get("m", 0)),
                       bf16, entries, dict(d.get("skipped", {})), d.get("source", "measured"),
                       str(d.get("dtype", "bfloat16")), None if buckets is None else tuple(int(b) for b in buckets))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed site timings ({type(e).__name__}: {e}); re-time the site "
                             "(Probe.time_sites, or plan with measure=True)") from None


__all__ = ["KernelTime", "SiteTiming", "Source"]
