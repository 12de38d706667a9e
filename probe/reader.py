"""The one reader of a probe report: every consumer (the planner, the gate) reads it here.

The probe's ``ProbeReport`` (loka.probe.report, schema in loka.probe.schema) holds
much more than a consumer needs. :func:`read_report` takes a ``ProbeReport``, its JSON
document (dict) or a path, checks its ``kind`` and ``schema_version`` and the types of
the fields read below (one ``ReportSchemaError`` line naming the path of the first
problem, never a traceback), and returns the document with non-finite floats decoded.
:func:`report_sites` gives each site as a typed :class:`SiteInfo`:

    sites[*].fqn, in_features, out_features, m_values
    sites[*].errors[recipe][gemm] = {mean, ci_lo, ci_hi, n, sqnr_db?, threshold?}
    sites[*].sensitivity[recipe] = {rel_loss_delta}          (optional)
    sites[*].timings = {device_name, representative, m,
                        bf16_ms: {gemm: ms},
                        entries: [{gemm, kernel, recipe, median_ms}]}   (optional)
    sites[*].fits[role] = [{family, params, ...}, ...]       (optional, best first)
    recipes[name] = {name, fprop, dgrad, wgrad}              (optional: hand-built candidates' fields)

:func:`report_recipes` gives every recipe the report measured as a Recipe object.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from loka.jsonio import decode_floats, read_json
from loka.probe.schema import NUM, OPT_NUM, ReportSchemaError, validate
from loka.recipe import GEMMS, Recipe
from loka.recipe_json import recipe_from_dict, resolve_recipe

# The part of the schema a consumer reads ("key?": optional); the probe writes all of REPORT.
READ_GEMM_ERROR = {"mean": NUM, "ci_lo": NUM, "ci_hi": NUM, "n": int, "sqnr_db?": OPT_NUM, "threshold?": OPT_NUM}
READ_TIMINGS = {"m?": int, "bf16_ms": {"*": NUM}, "entries": [{"gemm": str, "kernel": str, "recipe": str, "median_ms": NUM}]}
READ_SITE = {
    "fqn": str,
    "in_features": int,
    "out_features": int,
    "m_values?": [int],
    "errors?": {"*": {"*": READ_GEMM_ERROR}},
    "sensitivity?": {"*": {"rel_loss_delta?": NUM}},
    "timings?": (READ_TIMINGS, None),
    "fits?": {"*": [dict]},
}
READ_REPORT = {"sites": [READ_SITE], "recipes?": {"*": dict}}


@dataclass(frozen=True)
class GemmError:
    """One GEMM's measured relative error with its confidence interval."""

    mean: float
    ci_hi: float
    sqnr_db: float | None
    n: int
    ci_lo: float = -math.inf
    threshold: float | None = None


@dataclass
class SiteInfo:
    """One site as its consumers see it."""

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


def read_report(report) -> dict:
    """The checked document of a ``ProbeReport``, report dict or path (see module docstring)."""
    if isinstance(report, (str, os.PathLike)):
        doc = read_json(report, "probe report", ReportSchemaError)
        where = f"{os.fspath(report)}: "
    elif isinstance(report, (dict, list)):  # a JSON document (a list is refused by the check below)
        doc, where = report, ""
    elif isinstance(getattr(report, "doc", None), dict):  # a loka.probe.ProbeReport
        doc, where = report.doc, ""
    else:
        raise ReportSchemaError(f"a probe report is a ProbeReport, its JSON dict or a path, not {type(report).__name__}")
    try:
        validate(doc, READ_REPORT)
    except ReportSchemaError as exc:
        raise ReportSchemaError(f"{where}{exc}") from None
    except RecursionError:
        raise ReportSchemaError(f"{where}the report is nested too deeply to be a probe report") from None
    return decode_floats(doc)


def report_sites(report) -> list[SiteInfo]:
    """SiteInfo for every site of a ``ProbeReport``, report dict, or path to its JSON."""
    return [_site(s) for s in read_report(report)["sites"]]


def report_recipes(report) -> dict[str, Recipe]:
    """name -> Recipe of every recipe with errors in the report: hand-built ones from the report's
    ``recipes`` fields, the others by name (a name that is neither is left out: its consumer says so);
    ``ReportSchemaError`` (one line) if a recorded recipe cannot be built."""
    doc = read_report(report)
    defined = {}
    for name, d in (doc.get("recipes") or {}).items():
        try:
            defined[name] = recipe_from_dict(d)
        except ValueError as exc:
            raise ReportSchemaError(f"recipes.{name}: {exc}") from None
    names = {r for s in doc["sites"] for r in (s.get("errors") or {})}
    out = {}
    for name in sorted(names):
        try:
            out[name] = resolve_recipe(name, defined)
        except ValueError:
            continue
    return out


def _num(v, default=math.nan) -> float:
    return default if v is None else float(v)


def _site(s: dict) -> SiteInfo:
    timings = s.get("timings") or None
    m_values = s.get("m_values") or []
    m = int(timings["m"]) if timings and "m" in timings else (max(m_values) if m_values else 0)
    errors = {}
    for recipe, per_gemm in (s.get("errors") or {}).items():
        errors[recipe] = {
            g: GemmError(_num(e["mean"]), _num(e["ci_hi"], math.inf), _opt(e.get("sqnr_db")), int(e["n"]),
                         _num(e["ci_lo"]), _opt(e.get("threshold")))
            for g, e in per_gemm.items() if g in GEMMS
        }
    deltas = {r: _num(v.get("rel_loss_delta")) for r, v in (s.get("sensitivity") or {}).items()}
    fits = {role: fl[0] for role, fl in (s.get("fits") or {}).items() if fl}
    return SiteInfo(s["fqn"], int(s["in_features"]), int(s["out_features"]), int(m), errors, deltas, timings, fits)


def _opt(v) -> float | None:
    return None if v is None else _num(v)

def speedup(timings: dict | None, recipe: str | None) -> float | None:
    """bf16 time / fastest kernel time for ``recipe``, summed over the GEMMs timed for both."""
    if not timings or recipe is None:
        return None
    best: dict[str, float] = {}
    for e in timings["entries"]:
        if e["recipe"] == recipe:
            best[e["gemm"]] = min(best.get(e["gemm"], math.inf), e["median_ms"])
    gemms = [g for g in best if g in timings["bf16_ms"]]
    if not gemms:
        return None
    return sum(timings["bf16_ms"][g] for g in gemms) / sum(best[g] for g in gemms)


def speed_timings(site: dict) -> dict | None:
    """The timings a site entry's speed rests on: measured on a GPU, else the speed model's."""
    t = site.get("timings")
    return t if t and t["representative"] else site.get("modeled_timings")
