"""``plan(report, budget)``: the fastest kernel per GEMM and site that the accuracy budget allows.

For every GEMM of every site the planner lists the options: each candidate
recipe the probe measured whose error bound passes the per-GEMM budget, on the
fastest kernel that is available here, takes the recipe at the site's shape,
and was timed faster than bf16 (by the probe's timings, timings passed in, or
micro-benchmarks run now with ``measure=True``). Each option saves
``bf16_ms - kernel_ms`` per step and costs ``sensitivity x error`` of the
model-level budget. An exact multiple-choice knapsack (loka.dispatch.solver)
picks at most one option per GEMM to maximize the time saved; every GEMM left
in bf16 gets the reason it was left there.

``objective="accuracy"`` drops the speed test: every GEMM whose error passes the
budget and that a kernel here takes gets its lowest-error recipe, fast or not, and
the solver maximizes the number of GEMMs converted under the model-level budget.
That plan answers "what does FP8 do to my model's quality?" (convert, train or
evaluate with it, then ``loka gate``) where the speed plan keeps everything in bf16;
it is not a plan to ship for speed (its expected speedup is usually below 1).

The result is a ``loka.dispatch.plans.Plan`` (the file format); ``plan_table`` renders it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import math
from importlib.metadata import version as _v
from dataclasses import dataclass

import torch

from loka.dispatch.budget import Budget
from loka.dispatch.keys import ChoiceKey, GemmKey
from loka.dispatch.microbench import combine_buckets, model_timings, open_cache, time_serving_buckets
from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.dispatch.producer_pricing import CastPricer, check_producers, producer_feeds
from loka.dispatch.solver import Option, solve
from loka.devices import Target, detect_target, get_target
from loka.kernels import KERNELS
from loka.probe.timing import time_site
from loka.kernels.costmodel import DEVICE_MODELS
from loka.probe.reader import GemmError, SiteInfo, report_recipes, report_sites
from loka.recipe import GEMMS, Recipe, gemm_shape
from loka.recipe_json import needs_fields


OBJECTIVES = ("speed", "accuracy")


@dataclass(frozen=True)
class _Candidate:
    kernel: str
    recipe: Recipe
    ms: float
    err: GemmError
    cast_saved_ms: float = 0.0  # the input's cast a producer does instead (loka.dispatch.producer_pricing)
    extrapolated: bool = False  # its time is the speed model's outside the measured region (costmodel)

    @property
    def key(self) -> ChoiceKey:
        return ChoiceKey(self.kernel, self.recipe.name)


@dataclass
class _GemmOptions:
    bf16_ms: float | None
    candidates: list  # passing budget and faster than bf16, best kernel per recipe
    reason: str  # why bf16 if no candidate is chosen


def plan(
    report,
    budget: Budget | None = None,
    *,
    timings: dict | None = None,
    measure: bool = False,
    device: torch.device | str | None = None,
    kernels: list[str] | None = None,
    method: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    refresh: bool = False,
    cache_dir=None,
    progress: bool = True,
    bench: dict | None = None,
    m_buckets: list[int] | None = None,
    keep_bf16: dict[str, str] | None = None,
    speed_model: str | None = None,
    producers: dict[str, str] | None = None,
    target: Target | str | None = None,
    objective: str = "speed",
) -> Plan:
    """Plan every site of ``report`` (a ProbeReport, its dict, or a JSON path) under ``budget``.

    Timings per site come from ``timings[fqn]`` (the report's timings format), else the
    report, else (``measure=True``) micro-benchmarks on ``device`` (cached on disk,
    ``refresh=True`` re-measures; ``bench`` passes e.g. ``{"warmup": 5, "iters": 20}``).
    ``kernels`` restricts the kernels considered. ``m_buckets`` makes a *serving* plan: only
    fprop, timed now at each declared batch size M and summed (backward GEMMs stay bf16).
    ``method``: ``"auto"`` (exact milp, greedy if it fails), ``"exact"`` or ``"greedy"``.
    ``keep_bf16``: ``{fqn: reason}`` of sites a policy keeps in bf16 (e.g.
    ``loka.mods.keep_in_hp``); they get no FP8 candidate and the reason in the plan.
    ``speed_model``: ``"h100"`` / ``"h200"`` rank kernels by that GPU's speed model
    (loka.kernels.costmodel) at every site instead of timings, for planning where that GPU is
    not at hand; ``"measured"`` is ``measure=True``; None (default): the timings as above.
    ``producers``: ``{fqn: "norm_quant" | "compiled_cast"}`` of sites whose fprop input can
    arrive in FP8 from the op that produces it (``loka.dispatch.producers.producer_sites``);
    their FP8 candidates are priced without that cast (loka.dispatch.producer_pricing) and a
    site whose chosen fprop takes it records ``producer`` in the plan.
    ``target``: the device the plan is for (``"b200"``, ``"mi300x"``, a loka.devices.Target; default:
    ``device``'s, detected). Only the recipes and kernels it runs natively (loka/devices.py) are
    planned, and the plan records it. A target that is not ``device`` (planning for a B200 on a
    CPU) is priced by its speed model unless timings are given, and its kernels are not asked
    whether they run here.
    ``objective``: ``"speed"`` (default) or ``"accuracy"`` (every GEMM the accuracy budget
    allows, fast or not; see the module docstring).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not known; use one of {', '.join(OBJECTIVES)}")
    budget = budget or Budget()
    target = get_target(target) if isinstance(target, str) else (target or detect_target(device))
    here = detect_target(device)
    remote = target is not None and (here is None or here.arch != target.arch)
    if target is not None:  # the target's kernels; of those, the default candidates unless named
        kernels = [k for k in target.caps.kernels if k in KERNELS and (
            k in kernels if kernels is not None else not KERNELS.get(k).not_default)]
        if remote and speed_model is None and timings is None and not measure:
            speed_model = target.caps.speed_model
    if speed_model is not None:
        timings, measure = _speed_model_timings(report, speed_model, timings, measure, device, kernels, remote)
    keep_bf16 = dict(keep_bf16 or {})
    unknown_keep = sorted(set(keep_bf16) - {s.fqn for s in report_sites(report)})
    if unknown_keep:
        raise ValueError(f"keep_bf16 names sites the report does not have: {unknown_keep}; "
                         "use the fqns of the probed model (after its mods)")
    device = torch.device(device or "cpu")
    sites = report_sites(report)
    recipes = report_recipes(report)  # name -> Recipe: hand-built ones from the report's recorded fields
    producers = check_producers(producers, {s.fqn for s in sites})
    pricer = CastPricer(device, dtype)
    notes: list[str] = []
    bench = dict(bench or {}, refresh=refresh, cache=open_cache(cache_dir, device), progress=progress)
    if m_buckets:
        site_timings = _serving_timings(sites, m_buckets, device, dtype, kernels, bench, notes, recipes)
    else:
        site_timings = _gather_timings(sites, timings, measure, device, dtype, kernels, bench, notes, recipes)
    coefs = _sensitivities(sites, notes)
    options, per_gemm = [], {}
    for site in sites:
        for gemm in GEMMS:
            key = GemmKey(site.fqn, gemm)
            if site.fqn in keep_bf16:
                bf16_ms = (site_timings.get(site.fqn) or {}).get("bf16_ms", {}).get(gemm)
                go = _GemmOptions(bf16_ms, [], f"kept bf16 by policy: {keep_bf16[site.fqn]}")
            else:
                go = _gemm_options(site, gemm, budget, site_timings.get(site.fqn), device, kernels, dtype,
                                   (producers.get(site.fqn), pricer), target, remote, objective, recipes)
            per_gemm[key] = go
            for c in go.candidates:
                weight = _error_cost(coefs.get(site.fqn), c.err, gemm, budget)
                value = 1.0 if objective == "accuracy" else go.bf16_ms - c.ms  # GEMMs converted, or ms saved
                options.append(Option(key, c.key, value, weight))
    # Without sensitivities every weight is 0, so the cap binds nothing (a note says so).
    solution = solve(options, budget.max_model_ne_delta, method)
    if solution.note:
        notes.append(solution.note)
    if objective == "accuracy":
        notes.append("objective accuracy: every GEMM within the accuracy budget is converted with its lowest-error "
                     "recipe, fast or not; a plan to check FP8's quality (loka gate), not one to ship for speed")
    unchosen = _unchosen_reasons(options, solution, budget.max_model_ne_delta)
    for key, reason in unchosen.items():
        per_gemm[key].reason = reason
    site_plans = [_site_plan(s, per_gemm, solution.chosen, coefs.get(s.fqn), budget, producers.get(s.fqn))
                  for s in sites]
    notes.extend(pricer.notes(sum(p.producer is not None for p in site_plans)))
    device_info = _device_info(site_timings, device, notes)
    if target is not None:  # absent for plans without a target (files stay as they were)
        device_info.update(target=target.name, arch=target.arch)
        if remote:
            notes.append(f"planned for {target.describe()} away from it: only its recipes "
                         f"({', '.join(target.caps.recipes)}) and kernels, priced without running them here")
    return Plan(sites=site_plans, budget=budget.to_dict(), device=device_info,
                versions=library_versions(), solver=solution.solver, notes=notes,
                created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _speed_model_timings(report, speed_model: str, timings, measure: bool, device, kernels, remote: bool = False):
    """``(timings, measure)`` for ``plan(speed_model=...)``: a named GPU's model, or measuring."""
    choices = sorted(DEVICE_MODELS) + ["measured"]
    if speed_model not in choices:
        raise ValueError(f"speed model {speed_model!r} is not known; use one of {', '.join(choices)}")
    if timings is not None:
        raise ValueError("pass either timings or speed_model, not both")
    if speed_model == "measured":
        return None, True
    here = torch.device(device or "cpu")
    names = [k.name for k in KERNELS if not k.hp and not k.reference and (remote or k.available(here))
             and (kernels is None or k.name in kernels)]
    return model_timings(report, names, DEVICE_MODELS[speed_model]), False


def _unchosen_reasons(options: list[Option], solution, cap: float) -> dict:
    """Why each GEMM with a fast, accurate-enough option still stays bf16: the model-level budget,
    said as it happened (too costly alone, or outbid by GEMMs that saved more time)."""
    groups: dict[GemmKey, list[Option]] = {}
    for o in options:
        groups.setdefault(o.group, []).append(o)
    out = {}
    for group, opts in groups.items():
        if group in solution.chosen:
            continue
        cheapest = min(o.weight for o in opts)
        if cheapest > cap:
            why = (f"kept bf16: its FP8 error alone would cost {cheapest:.2g} relative NE (sensitivity x error bound), "
                   f"more than the whole model-level NE budget {cap:.2g}")
        elif not solution.chosen:
            why = (f"kept bf16: the {solution.solver} solver chose no GEMM under the model-level NE budget {cap:.2g} "
                   f"(this one would cost {cheapest:.2g})")
        else:
            why = (f"kept bf16: the model-level NE budget ({solution.weight:.2g} of {cap:.2g} used) went to "
                   f"{len(solution.chosen)} GEMM(s) that save more time per unit of error; this one would add "
                   f"{cheapest:.2g}")
        out[group] = why
    return out


def _gather_timings(sites, timings, measure, device, dtype, kernels, bench: dict, notes, recipes: dict) -> dict:
    out = {}
    for s in sites:
        t = (timings or {}).get(s.fqn) or s.timings
        if t is not None:
            out[s.fqn] = t
    missing = [s for s in sites if s.fqn not in out]
    if missing and measure:
        timed = [recipes[r] for r in sorted({r for s in missing for r in s.errors}) if r in recipes]
        for s in missing:
            out[s.fqn] = time_site((s.m, s.in_features, s.out_features), timed, kernels=kernels, dtype=dtype,
                                   device=device, fits=s.fits, **bench).to_dict()
    elif missing:
        notes.append(f"{len(missing)} sites have no timings; they stay in bf16 (plan with measure=True to time them)")
    return out


def _serving_timings(sites, m_buckets, device, dtype, kernels, bench: dict, notes, recipes: dict) -> dict:
    notes.append(f"serving plan: fprop only, timed at M in {sorted(set(int(m) for m in m_buckets))} and summed")
    timed = [recipes[r] for r in sorted({r for s in sites for r in s.errors}) if r in recipes]
    out = {}
    for s in sites:
        per_bucket = time_serving_buckets(s.in_features, s.out_features, list(m_buckets), timed, kernels=kernels,
                                          dtype=dtype, device=device, fits=s.fits, **bench)
        out[s.fqn] = combine_buckets(per_bucket).to_dict()
        s.m = out[s.fqn]["m"]
    return out


def _sensitivities(sites: list[SiteInfo], notes: list[str]) -> dict:
    """fqn -> sensitivity coefficient; sites without one get the largest measured (conservative)."""
    known = {s.fqn: s.sensitivity() for s in sites}
    measured = [v for v in known.values() if v is not None]
    if not measured:
        notes.append("the report has no sensitivity measurements: the model-level NE budget is not enforced "
                     "(run probe.measure_sensitivity to enforce it)")
        return {}
    worst = max(measured)
    unknown = sorted(f for f, v in known.items() if v is None)
    if unknown:
        notes.append(f"{len(unknown)} sites lack a sensitivity measurement; they are charged the largest measured "
                     f"({worst:.3g}): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return {f: (v if v is not None else worst) for f, v in known.items()}


def _error_cost(coef: float | None, err: GemmError, gemm: str, budget: Budget) -> float:
    if coef is None:
        return 0.0
    weight = 1.0 if gemm == "fprop" else budget.backward_weight
    return coef * err.ci_hi * weight


def _gemm_options(site: SiteInfo, gemm: str, budget: Budget, timings: dict | None, device, allowed, dtype,
                  producer=(None, None), target: Target | None = None, remote: bool = False,
                  objective: str = "speed", recipes: dict | None = None) -> _GemmOptions:
    shape = gemm_shape(gemm, site.m, site.in_features, site.out_features)
    bf16_ms = (timings or {}).get("bf16_ms", {}).get(gemm) if timings else None
    passing, failing = _recipes_within_budget(site, gemm, budget, target, recipes or {})
    if bf16_ms is None:
        if timings and "m_buckets" in timings:
            return _GemmOptions(None, [], f"kept bf16: serving plan, {gemm} does not run")
        return _GemmOptions(None, [], f"kept bf16: no timing for {gemm} at this site")
    if not passing:
        if failing:
            best = min(failing, key=lambda f: f[1])
            return _GemmOptions(bf16_ms, [], f"kept bf16: {best[2]} ({best[0]})")
        return _GemmOptions(bf16_ms, [], f"kept bf16: no FP8 error measured for {gemm}")
    best_per_recipe: dict[str, _Candidate] = {}
    unsupported: list[str] = []
    for e in (timings or {}).get("entries", []):
        if e.get("gemm") != gemm or e.get("recipe") not in passing:
            continue
        recipe, err = passing[e["recipe"]]
        why = _kernel_problem(e["kernel"], recipe, gemm, shape, dtype, device, allowed, remote)
        if why:
            unsupported.append(f"{e['kernel']}: {why}")
            continue
        c = _producer_priced(_Candidate(e["kernel"], recipe, float(e["median_ms"]), err,
                                        extrapolated=bool(e.get("extrapolated"))), gemm, shape, timings, *producer)
        if recipe.name not in best_per_recipe or c.ms < best_per_recipe[recipe.name].ms:
            best_per_recipe[recipe.name] = c
    if not best_per_recipe:
        why = sorted(set(unsupported)) or _why_no_kernel(passing, gemm, shape, dtype, device, allowed, remote)
        detail = f" ({'; '.join(why[:3])})" if why else ""
        return _GemmOptions(bf16_ms, [], f"kept bf16: no FP8 kernel available here takes {'/'.join(sorted(passing))} "
                                         f"at [M={shape[0]}, K={shape[1]}, N={shape[2]}]{detail}")
    if objective == "accuracy":  # the lowest error bound, the faster kernel on a tie
        best = min(best_per_recipe.values(), key=lambda c: (c.err.ci_hi, c.ms, c.key))
        return _GemmOptions(bf16_ms, [best], "kept bf16: not chosen within the model-level NE budget")
    fast = [c for c in best_per_recipe.values() if c.ms > 0 and bf16_ms / c.ms >= budget.min_speedup]
    if not fast:
        top = min(best_per_recipe.values(), key=lambda c: c.ms)
        k = shape[1]
        return _GemmOptions(bf16_ms, [], f"kept bf16: K={k}, no FP8 kernel faster than bf16 at this shape "
                                         f"(best {top.key} {bf16_ms / top.ms:.2f}x)")
    fast.sort(key=lambda c: (c.ms, c.key))
    return _GemmOptions(bf16_ms, fast, "kept bf16: not chosen within the model-level NE budget")


def _producer_priced(c: _Candidate, gemm: str, shape, timings: dict, producer: str | None,
                     pricer: CastPricer | None) -> _Candidate:
    """``c`` without its input's cast where ``producer`` hands that operand over in FP8."""
    if producer is None or not producer_feeds(producer, c.recipe, gemm, c.kernel):
        return c
    op = c.recipe.gemm(gemm).a
    casts = [pricer.cast_ms(timings, m, shape[1], op) for m in timings.get("m_buckets") or [shape[0]]]
    if any(t is None for t in casts):
        return c
    cast = sum(casts)  # a serving plan's fprop time is summed over its batch sizes, so is the cast
    cast = min(cast, 0.95 * c.ms)  # a noisy cast timing never makes a GEMM free
    return _Candidate(c.kernel, c.recipe, c.ms - cast, c.err, cast, c.extrapolated)


def _recipes_within_budget(site: SiteInfo, gemm: str, budget: Budget, target: Target | None, recipes: dict):
    """``(passing, failing)``: name -> (Recipe, GemmError) within the budget; (name, error, why) of the others."""
    passing: dict[str, tuple[Recipe, GemmError]] = {}
    failing: list[tuple[str, float, str]] = []
    for recipe in sorted(site.errors):
        if target is not None and not (target.caps.runs_recipe(recipes[recipe]) if recipe in recipes
                                       else target.caps.runs(recipe)):
            failing.append((recipe, math.inf, f"{recipe} does not run on {target.describe()}"))
            continue
        e = site.errors[recipe].get(gemm)
        if recipe not in recipes:
            failing.append((recipe, math.inf, f"recipe {recipe!r} is not a named loka recipe and the report does "
                                              "not record its fields (re-probe with this loka version)"))
            continue
        g = recipes[recipe].gemm(gemm)
        if g.is_hp:
            continue
        if e is None or e.n == 0:
            failing.append((recipe, math.inf, f"no {gemm} error measured"))
            continue
        why = budget.gemm_check(gemm, e.ci_hi, e.sqnr_db)
        if why:
            failing.append((recipe, e.ci_hi, why))
        else:
            passing[recipe] = (recipes[recipe], e)
    return passing, failing


def _kernel_problem(name: str, recipe: Recipe, gemm: str, shape, dtype, device, allowed, remote: bool = False) -> str | None:
    if allowed is not None and name not in allowed:
        return "not in the kernels allowed"
    if name not in KERNELS:
        return "not a registered kernel"
    kernel = KERNELS.get(name)
    if kernel.reference:
        return f"{name} is the numerical reference, never planned"
    if allowed is None and kernel.not_default:
        return f"not a default candidate: {kernel.not_default}"
    if gemm not in kernel.gemms:
        return f"implements {sorted(kernel.gemms)} only"
    ok, why = (True, "") if remote else kernel.available(device)  # remote: the target's table says it runs there
    if not ok:
        return why
    ok, why = kernel.supports(recipe.gemm(gemm), shape, dtype, device)
    return None if ok else why


def _why_no_kernel(passing, gemm, shape, dtype, device, allowed, remote: bool = False) -> list[str]:
    """Reasons the kernels available here give for not taking the passing recipes at ``shape``."""

    reasons = []
    for kernel in KERNELS:
        if kernel.hp or kernel.reference or (allowed is not None and kernel.name not in allowed):
            continue
        if allowed is None and kernel.not_default:
            continue
        if not remote and not kernel.available(device):
            continue
        for name in sorted(passing):
            ok, why = kernel.supports(passing[name][0].gemm(gemm), shape, dtype, device)
            if not ok:
                reasons.append(f"{kernel.name}: {why}")
    return sorted(set(reasons))


def _site_plan(site: SiteInfo, per_gemm: dict, chosen: dict, coef, budget: Budget, producer: str | None) -> SitePlan:
    gemms, takes_producer = {}, False
    for gemm in GEMMS:
        go: _GemmOptions = per_gemm[GemmKey(site.fqn, gemm)]
        pick = chosen.get(GemmKey(site.fqn, gemm))
        cand = next((c for c in go.candidates if c.key == pick), None)
        if cand is None:
            gemms[gemm] = GemmChoice(reason=go.reason, bf16_ms=go.bf16_ms)
            continue
        limit = budget.max_rel_error[gemm]
        reason = (f"{cand.key}: {go.bf16_ms / cand.ms:.2f}x vs bf16, rel. error <= "
                  f"{cand.err.ci_hi:.1e} (budget {limit:.1e})")
        if cand.extrapolated:
            reason += ("; speed-model time extrapolated outside its measured range (M, K, N): "
                       "measure this site on the GPU before trusting the win")
        if cand.cast_saved_ms:
            takes_producer = True
            reason += f"; input in FP8 from its producer ({producer}), its cast ({cand.cast_saved_ms:.3g} ms) not paid"
        gemms[gemm] = GemmChoice(cand.kernel, cand.recipe.name, reason, cand.err.ci_hi, cand.err.sqnr_db, go.bf16_ms,
                                 cand.ms, _error_cost(coef, cand.err, gemm, budget),
                                 spec=cand.recipe if needs_fields(cand.recipe) else None)
    return SitePlan(site.fqn, site.in_features, site.out_features, site.m, gemms, coef,
                    producer if takes_producer else None)


def _device_info(site_timings: dict, device, notes: list[str]) -> dict:
    names = sorted({t.get("device_name", "unknown") for t in site_timings.values()})
    rep = all(bool(t.get("representative", False)) for t in site_timings.values()) if site_timings else False
    if len(names) > 1:
        notes.append(f"timings come from several devices: {names}")
    modelled = bool(site_timings) and all(t.get("source") == "model" for t in site_timings.values())
    if modelled:
        notes.append("timings are predicted by a GPU speed model (loka.kernels.costmodel), not measured: "
                     "they rank kernels; measure on the GPU before trusting a speedup")
    elif site_timings and not rep:
        notes.append("timings are not representative (CPU): do not expect these speedups on a GPU")
    info = {"name": names[0] if len(names) == 1 else (", ".join(names) or str(device)), "representative": rep,
            "planned_on": str(device)}
    if modelled:
        info["source"] = "model"
    return info


def library_versions() -> dict:
    """Versions of torch and every kernel library (None: not installed)."""

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "torchao", "transformer_engine"):
        version = None
        if importlib.util.find_spec(mod) is not None:
            try:
                version = _v({"transformer_engine": "transformer-engine"}.get(mod, mod))
            except Exception:  # metadata missing for a source install
                version = "unknown"
        out[mod] = version
    try:
        out["loka"] = _v("loka")
    except Exception:  # running from a source tree without metadata
        out["loka"] = "unknown"
    return out
