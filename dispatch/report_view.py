"""What the planner reads from a probe report, and nothing more.

The probe's ``ProbeReport`` (loka.probe.report, schema in loka.probe.schema) holds
much more than a plan needs. This module reads the few fields the planner uses,
from a ``ProbeReport``, its JSON document (dict) or a path, so the planner
depends on the report's *fields*, not its class:

    sites[*].fqn, in_features, out_features, m_values
    sites[*].errors[recipe][gemm] = {mean, ci_hi, sqnr_db, n}
    sites[*].sensitivity[recipe] = {rel_loss_delta}          (optional)
    sites[*].timings = {device_name, representative, m,
                        bf16_ms: {gemm: ms},
                        entries: [{gemm, kernel, recipe, median_ms}]}   (optional)
    sites[*].fits[role] = [{family, params, ...}, ...]       (optional, best first)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loka.recipe import GEMMS


@dataclass(frozen=True)
class GemmError:
    mean: float
    ci_hi: float
    sqnr_db: float | None
    n: int


@dataclass
class SiteInfo:
    """One site as the planner sees it."""

    fqn: str
    in_features: int
    out_features: int
    m: int
    errors: dict = field(default_factory=dict)  # recipe -> gemm -> GemmError
    rel_loss_delta: dict = field(default_factory=dict)  # recipe -> float
    timings: dict | None = None  # the report's timings entry (see module doc)
    fits: dict = field(default_factory=dict)  # role -> best fit dict

    def sensitivity(self) -> float | None:
        """Relative NE change per unit relative fprop error, averaged over measured recipes."""
        coefs = []
        for recipe, delta in self.rel_loss_delta.items():
            e = self.errors.get(recipe, {}).get("fprop")
            if e is not None and e.mean > 0 and math.isfinite(e.mean) and math.isfinite(delta):
                coefs.append(abs(delta) / e.mean)
        return sum(coefs) / len(coefs) if coefs else None


def _num(v, default=math.nan) -> float:
    if v is None:
        return default
    if isinstance(v, str):
        return float(v)  # "inf" / "nan" as the probe writes them
    return float(v)


def report_sites(report) -> list[SiteInfo]:
    """SiteInfo for every site of a ``ProbeReport``, report dict, or path to its JSON."""
    doc = _as_doc(report)
    sites = doc.get("sites")
    if not isinstance(sites, list):
        raise ValueError("the report has no 'sites' list; pass a loka.probe ProbeReport or its JSON file")
    return [_site(s, i) for i, s in enumerate(sites)]


def _as_doc(report) -> dict:
    if isinstance(report, (str, Path)):
        path = Path(report)
        if not path.exists():
            raise ValueError(f"report file {path} does not exist")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); pass the probe report JSON `loka probe` wrote") from None
    if isinstance(report, dict):
        return report
    doc = getattr(report, "doc", None)
    if isinstance(doc, dict):
        return doc
    raise TypeError(f"plan needs a ProbeReport, its JSON dict or a path, got {type(report).__name__}")


def _site(s: dict, i: int) -> SiteInfo:
    for key in ("fqn", "in_features", "out_features"):
        if key not in s:
            raise ValueError(f"report sites[{i}] lacks {key!r}; is this a loka probe report?")
    timings = s.get("timings") or None
    m_values = s.get("m_values") or []
    m = int(timings["m"]) if timings and "m" in timings else (max(m_values) if m_values else 0)
    errors = {}
    for recipe, per_gemm in (s.get("errors") or {}).items():
        errors[recipe] = {
            g: GemmError(_num(e.get("mean")), _num(e.get("ci_hi"), math.inf), _opt(e.get("sqnr_db")), int(e.get("n", 0)))
            for g, e in per_gemm.items() if g in GEMMS and isinstance(e, dict)
        }
    deltas = {r: _num(v.get("rel_loss_delta")) for r, v in (s.get("sensitivity") or {}).items() if isinstance(v, dict)}
    fits = {role: fl[0] for role, fl in (s.get("fits") or {}).items() if fl}
    return SiteInfo(s["fqn"], int(s["in_features"]), int(s["out_features"]), int(m), errors, deltas, timings, fits)


def _opt(v) -> float | None:
    return None if v is None else _num(v)


def gemm_shape(gemm: str, m: int, k: int, n: int) -> tuple[int, int, int]:
    """(rows of a, reduction, rows of b) of ``gemm`` for a site ``y[M,N] = x[M,K] · W[N,K]ᵀ``."""
    return {"fprop": (m, k, n), "dgrad": (m, n, k), "wgrad": (n, m, k)}[gemm]
