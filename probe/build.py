"""Turning a Probe's state into a ProbeReport document (see loka/probe/schema.py)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from importlib.metadata import version

import torch

from loka.devices import get_target
from loka.kernels.costmodel import DEVICE_MODELS, H100_SXM
from loka.kernels.kernel import modelled_kernels
from loka.probe.error import SAFE, UNDECIDED, UNSAFE
from loka.probe.fit import Fit, fit_values, gemm_fits, predict_gemm_error
from loka.probe.reader import speedup
from loka.probe.report import ProbeReport
from loka.probe.schema import KIND, SCHEMA_VERSION
from loka.probe.timing import time_site
from loka.recipe import GEMMS, as_recipe, gemm_shape
from loka.recipe_json import needs_fields, recipe_to_dict


def _config_dict(cfg) -> dict:
    return {
        "schedule": dataclasses.asdict(cfg.schedule),
        "include": list(cfg.include),
        "exclude": list(cfg.exclude),
        "candidates": [c if isinstance(c, str) else c.name for c in cfg.candidates],
        "predict": [c if isinstance(c, str) else c.name for c in cfg.predict],
        "thresholds": {g: cfg.threshold(g) for g in GEMMS},
        "confidence": cfg.confidence,
        "min_samples": cfg.min_samples,
        "max_rows": cfg.max_rows,
        "capture_rows": cfg.capture_rows,
        "sensitivity_threshold": cfg.sensitivity_threshold,
        "overhead_budget": cfg.overhead_budget,
        "background": cfg.background,
    }


def _fits(st) -> dict:
    return {role: [f.to_dict() for f in fit_values(v)] for role, v in st.samples.items()}


def _predicted(st, fits: dict, predict: tuple) -> dict:
    """Errors of recipes not measured, predicted from the best fit of each operand."""

    best = {role: Fit.from_dict(fs[0]) for role, fs in fits.items() if fs}
    if not st.m_values:
        return {}
    m = int(sorted(st.m_values)[len(st.m_values) // 2])
    out = {}
    for name in predict:
        recipe = as_recipe(name)  # a name or a Recipe (hand-built)
        per_gemm = {}
        for gemm in GEMMS:
            pair = gemm_fits(best, gemm)
            if pair is None or recipe.gemm(gemm).is_hp:
                continue
            shape = gemm_shape(gemm, m, st.site.in_features, st.site.out_features)
            per_gemm[gemm] = predict_gemm_error(*pair, recipe.gemm(gemm), shape, trials=2)
        out[recipe.name] = per_gemm
    return out



def modeled_timings(st, recipes, target: str | None = None) -> dict | None:
    """The speed model's timings of ``recipes`` at the site's median M (None if it never ran): the
    ``target`` GPU's model and kernels (loka/devices.py), else the H100's. The kernels are those the
    speed model prices (``GemmKernel.modelled``: cuBLAS after separate casts, the Triton kernel that
    fuses the activation's cast)."""

    if not st.m_values or not recipes:
        return None
    m = int(sorted(st.m_values)[len(st.m_values) // 2])
    shape = (m, st.site.in_features, st.site.out_features)
    if target is None:
        return time_site(shape, list(recipes), model=H100_SXM, kernels=modelled_kernels()).to_dict()
    caps = get_target(target).caps
    return time_site(shape, list(recipes), model=DEVICE_MODELS[caps.speed_model],
                     kernels=modelled_kernels(caps.arch)).to_dict()



def _speed_phrase(timings: dict, best: str, sp: float) -> str:
    if timings.get("source") == "model":
        return (f"; but {best} is predicted slower than bf16 at this shape: {sp:.2f}x incl. quantization by the "
                f"{timings['device_name']} (measure on the GPU with Probe.time_sites)")
    return f"; but {best} is slower than bf16 here (speedup {sp:.2f}x)"


SPEED_TIE = 0.02  # speedups within 2% of the best count as equal: error decides among them


def _site_verdict(recipe_verdicts: dict, errors: dict, timings: dict | None) -> tuple[str, str | None, float | None, str, str]:
    """(verdict, best_recipe, speedup, speed, reason) of a site from its recipes' verdicts.

    ``timings``: representative (GPU) timings, else the speed model's (see :func:`loka.probe.reader.speed_timings`).
    """
    safe = [r for r, v in recipe_verdicts.items() if v["verdict"] == SAFE]
    if safe:
        speedups = {r: speedup(timings, r) for r in safe}
        timed = {r: s for r, s in speedups.items() if s is not None}
        # The fastest; among recipes within SPEED_TIE of it (or all, untimed) the lowest error bound,
        # the recipe loka.app.demo.fp8 and the accuracy-objective plan choose too.
        top = max(timed.values()) if timed else None
        tied = [r for r in safe if top is None or (r in timed and timed[r] >= top * (1 - SPEED_TIE))]
        best = min(tied, key=lambda r: (max([s["ci_hi"] for s in errors[r].values() if s["n"]], default=math.inf), r))
        sp = speedups[best]
        speed = "unknown" if sp is None else ("fast" if sp > 1.0 else "slow")
        reason = f"{best} safe: {recipe_verdicts[best]['reason']}"
        if speed == "slow":
            reason += _speed_phrase(timings, best, sp)
        return SAFE, best, sp, speed, reason
    if recipe_verdicts and all(v["verdict"] == UNSAFE for v in recipe_verdicts.values()):
        first = next(iter(recipe_verdicts))
        return UNSAFE, None, None, "unknown", f"every candidate unsafe, e.g. {first}: {recipe_verdicts[first]['reason']}"
    open_ = [r for r, v in recipe_verdicts.items() if v["verdict"] == UNDECIDED]
    if not open_:
        return UNDECIDED, None, None, "unknown", "no candidate recipe measured"
    return UNDECIDED, None, None, "unknown", f"{open_[0]}: {recipe_verdicts[open_[0]]['reason']}"


def _apply_sensitivity(recipe_verdicts: dict, sensitivity: dict, threshold: float | None) -> dict:
    """A recipe whose emulated fprop alone raises the loss by more than ``threshold`` (relative; the
    interval's lower bound over the sensitivity batches) is unsafe at the site."""
    if threshold is None:
        return recipe_verdicts
    out = dict(recipe_verdicts)
    for name, v in recipe_verdicts.items():
        sens = sensitivity.get(name)
        if sens is None or v["verdict"] == UNSAFE or not sens["ci_lo"] > threshold:
            continue
        out[name] = {"verdict": UNSAFE,
                     "reason": f"sensitive: FP8 fprop here alone raises the loss by {sens['rel_loss_delta']:.2%} "
                               f"(CI low {sens['ci_lo']:.2%} > {threshold:.2%}, {sens['n']} batches)"}
    return out


def site_entry(probe, fqn: str) -> dict:
    st, cfg = probe.state[fqn], probe.config
    errors = st.gemm_summaries(cfg)
    recipe_verdicts = _apply_sensitivity(st.recipe_verdicts(cfg), probe.sensitivity.get(fqn, {}),
                                         cfg.sensitivity_threshold)
    fits = _fits(st)
    timings = probe.timings.get(fqn)
    measured = timings if timings and timings["representative"] else None
    by_name = {r.name: r for r in probe.recipes}  # Recipe objects: hand-built ones have no name to resolve
    modeled = None if measured else modeled_timings(st, [by_name.get(n, n) for n in errors], cfg.target)
    verdict, best, speedup, speed, reason = _site_verdict(recipe_verdicts, errors, measured or modeled)
    return {
        "fqn": fqn,
        "module_type": st.site.module_type,
        "in_features": st.site.in_features,
        "out_features": st.site.out_features,
        "m_values": sorted(st.m_values),
        "micro_batches": st.micro_batches,
        "steps": list(st.steps),
        "operands": {role: s.summary() for role, s in st.operands.items() if not s.empty},
        "fits": fits,
        "errors": errors,
        "predicted_errors": _predicted(st, fits, cfg.predict),
        "recipe_verdicts": recipe_verdicts,
        "sensitivity": probe.sensitivity.get(fqn, {}),
        "timings": timings,
        "modeled_timings": modeled,
        "verdict": verdict,
        "speed": speed,
        "speed_source": None if speed == "unknown" else ("model" if modeled else "measured"),
        "best_recipe": best,
        "speedup": speedup,
        "reason": reason,
    }


def _target_meta(cfg) -> dict:
    """``{"target", "target_arch"}`` of a probe made for a GPU (absent otherwise: reports stay as they were)."""
    if cfg.target is None:
        return {}
    t = get_target(cfg.target)
    return {"target": t.name, "target_arch": t.arch}


def build_report(probe, **meta):
    """A ProbeReport of everything ``probe`` learned (``meta`` is stored as given)."""
    try:
        loka_version = version("loka")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        loka_version = "unknown"
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta": {"loka_version": loka_version, "torch_version": torch.__version__, **_target_meta(probe.config),
                 **meta},
        "config": _config_dict(probe.config),
        "sampled_steps": sorted(probe.sampled_steps),
        "sites": [site_entry(probe, fqn) for fqn in probe.state],
    }
    hand_built = {r.name: recipe_to_dict(r) for r in map(as_recipe, (*probe.config.candidates, *probe.config.predict))
                  if needs_fields(r)}
    if hand_built:  # absent when every candidate is a named recipe (reports stay as they were)
        doc["recipes"] = hand_built
    if probe.census is not None:
        doc["coverage"] = probe.census.summary()  # every GEMM of a step, its share, what loka converts
    return ProbeReport(doc)
