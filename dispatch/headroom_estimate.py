"""``estimate_headroom``: the whole answer (regimes, per arch, what a plan captures, levers) as one JSON doc.

The document is what ``loka headroom`` prints, ``loka plan`` summarizes and the probe report shows
(``loka.probe.headroom_section`` renders it: the probe layer gets the document, not this code).
"""

from __future__ import annotations

from loka.dispatch.headroom import (ALL_PRODUCERS, REGIMES, HeadroomOptions, captured, price_regime, regime_summary,
                                    saved_ms, step_parts_ms)
from loka.dispatch.headroom_census import GemmSite, StepCensus, model_census
from loka.dispatch.headroom_levers import levers
from loka.dispatch.plans import Plan
from loka.dispatch.producers import producer_sites
from loka.kernels.costmodel import CALIBRATED_REGIONS, DEVICE_MODELS, DeviceModel

HEADROOM_KIND = "loka.headroom"


def _step(parts: dict[str, float], opts: HeadroomOptions) -> tuple[float, str]:
    if opts.bf16_step_ms is not None:
        return opts.bf16_step_ms, f"measured: {opts.step_source}"
    rest = parts["optimizer"] + parts["embedding"] + parts["elementwise"]
    return parts["gemm"] + parts["bmm"] + parts["attention"] + rest, (
        "model: GEMMs and attention at the device model's peaks, optimizer, embedding update and eager "
        "elementwise work at its bandwidth, no launch gaps or data loading: a lower bound of the real step, so its "
        "speed-ups are upper bounds (bench/results: the base ranker's measured step is over 10x this model's); "
        "give the measured bf16 step to anchor them")


def estimate_headroom(census: StepCensus, dev: DeviceModel, opts: HeadroomOptions | None = None,
                      plan: Plan | None = None) -> dict:
    """The headroom of ``census`` on ``dev``: per regime the bound and step speed-up as bands, per arch,
    what ``plan`` captures, and the levers (``loka.dispatch.headroom_levers``). JSON-ready."""
    opts = opts or HeadroomOptions()
    unknown = sorted(set(opts.producers) - {s.fqn for s in census.sites})
    if unknown:
        raise ValueError(f"producers names sites the census does not have: {unknown[:5]}; "
                         "use the fqns of the recorded model (loka.dispatch.producers.producer_sites finds them)")
    parts = step_parts_ms(census, dev, opts)
    core = parts["gemm"] + parts["bmm"] + parts["attention"]
    step, step_source = _step(parts, opts)
    notes = []
    if opts.bf16_step_ms is not None and step < core:
        notes.append(f"the measured step ({step:.3g} ms) is shorter than the modelled GEMMs + attention ({core:.3g} ms): "
                     "the speed model is slower than this device; the step figures are conservative")
        step = max(step, core)
    prices = {r: price_regime(census, r, dev, opts) for r in (*REGIMES, ALL_PRODUCERS)}
    regimes = {r: regime_summary(p, core, step) for r, p in prices.items()}
    doc = {"kind": HEADROOM_KIND, "model": census.label, "device_model": dev.name,
           "assumptions": {"attention_efficiency": opts.attention_efficiency, "min_width": opts.min_width,
                           "recompute": opts.recompute, "serving": opts.serving,
                           "producers": dict(sorted(dict(opts.producers).items()))},
           "step": {"bf16_ms": step, "source": step_source, "parts_ms": parts, "core_ms": core},
           "regimes": regimes, "captured": None, "notes": notes + list(census.notes),
           "calibration": _calibration_lines(dev)}
    if plan is not None:
        doc["captured"] = captured(prices["producers"], plan, saved_ms(prices["producers"]))
    else:
        doc["notes"].append("no plan given: what a plan captures, and the GEMMs its accuracy budget keeps in bf16 "
                            "(a lever), need one (loka headroom --plan plan.json)")
    doc["levers"] = levers(census, dev, opts, prices, parts, step, plan)
    return doc


def _calibration_lines(dev: DeviceModel) -> list[str]:
    """One line per measured extent (kernels sharing it named together)."""
    extents: dict[tuple, list[str]] = {}
    for r in CALIBRATED_REGIONS.get(dev.name, ()):
        extents.setdefault((r.m, r.k, r.n, r.source), []).append(r.kernel)
    return ([f"{' and '.join(kernels)} measured at M {m[0]}-{m[1]}, K {k[0]}-{k[1]}, N {n[0]}-{n[1]} ({src})"
             for (m, k, n, src), kernels in extents.items()]
            or [f"{dev.name} has no measured region: every figure is extrapolated"])


def plan_headroom(plan: Plan, dev: DeviceModel, bf16_step_ms: float | None = None, step_source: str = "") -> dict:
    """The headroom of a plan's own sites (GEMMs only: a plan knows no attention, bmm or rest of the
    step), with the plan's producers, and what the plan captures of it. ``loka plan`` prints its summary."""
    sites = tuple(GemmSite(s.fqn, max(int(s.m), 1), s.in_features, s.out_features) for s in plan.sites)
    census = StepCensus(sites, label="the plan's sites (GEMMs only; `loka headroom` prices the whole step)")
    producers = {s.fqn: s.producer for s in plan.sites if s.producer}
    opts = HeadroomOptions(producers=producers, bf16_step_ms=bf16_step_ms, step_source=step_source)
    return estimate_headroom(census, dev, opts, plan)


def model_headroom(model, sample, device: str = "h200", *, label: str = "model", plan: Plan | None = None,
                   **options) -> dict:
    """The headroom of any ``model``'s training step on ``sample`` (run it under ``FakeTensorMode`` for a
    model too large to run here), with loka's ``norm_quant`` producers found on its dataflow;
    ``options``: ``HeadroomOptions`` fields (``attention_efficiency``, ``bf16_step_ms``, ...)."""
    if device not in DEVICE_MODELS:
        raise ValueError(f"device={device!r} has no speed model; use one of {sorted(DEVICE_MODELS)}")
    census = model_census(model, sample, label)
    opts = HeadroomOptions(producers=producer_sites(model, sample), **options)
    return estimate_headroom(census, DEVICE_MODELS[device], opts, plan)
