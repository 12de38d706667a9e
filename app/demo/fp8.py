"""Which FP8 model ``loka demo`` trains next to bf16, and what the speed model expects of it.

Normally that is the plan: ``apply_plan(model, plan)``. At the ``small`` ranker's
shapes (K, N <= 288) no FP8 kernel beats bf16 on an H100 once the quantization is
counted (bench/results/h100_2026-11-22_gemm.md: FP8 GEMMs beat bf16 from K, N = 1024,
and with the quantization counted only from K, N = 2048 at M = 32768), so the plan keeps
every site in bf16, and training "in FP8" would train bf16 twice. To still show
what FP8 does to NE, the demo then converts every site that the probe found
accuracy-safe and no policy keeps in bf16, with the safe recipe that torch._scaled_mm
runs (tensorwise or rowwise, lower error first), and says plainly that this model is
*not* the plan and that the speed model expects it to be slower.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from loka.convert import convert
from loka.devices import get_target
from loka.dispatch import apply_plan
from loka.kernels import KERNELS
from loka.dispatch.producers import apply_producers
from loka.kernels.costmodel import H100_SXM
from loka.probe.timing import time_site

WHATIF_RECIPES = ("tensorwise", "rowwise")  # what torch._scaled_mm runs on H100


@dataclass
class Fp8Choice:
    """The FP8 model's provenance: ``"plan"`` or ``"safe-sites"`` (see module docstring)."""

    kind: str
    sites: dict[str, str] = field(default_factory=dict)  # fqn -> recipe
    expected_speedup: float | None = None
    note: str = ""


def runnable_here(plan, device):
    """``plan`` with every FP8 GEMM whose kernel cannot run on ``device`` moved to ``emulated``
    (same recipe, same numerics: a B200 plan trained on a CPU or an H100), no longer bound to the
    plan's GPU; the plan itself when all can run."""
    def here(choice):
        if not choice.is_fp8 or KERNELS.get(choice.kernel).available(device):
            return choice
        return replace(choice, kernel="emulated", reason=f"{choice.reason} [emulated here: {choice.kernel} needs "
                                                          f"{plan.device.get('target', 'its GPU')}]")
    sites = [replace(s, gemms={g: here(c) for g, c in s.gemms.items()}) for s in plan.sites]
    if sites == plan.sites:
        return plan
    # emulated GEMMs run anywhere: the copy is no longer bound to the target's architecture
    device = {k: v for k, v in plan.device.items() if k not in ("target", "arch")}
    return replace(plan, sites=sites, device={**device, "emulating": plan.device.get("target", "")})


def safe_site_recipes(report, keep: dict[str, str], target: str | None = None) -> dict[str, str]:
    """{fqn: recipe} of every accuracy-safe site not kept in bf16, with its lowest-error safe recipe
    (among the ``target`` GPU's recipes, else ``WHATIF_RECIPES``)."""
    candidates = get_target(target).caps.recipes if target else WHATIF_RECIPES
    out = {}
    for s in report.sites:
        if s["fqn"] in keep or s["verdict"] != "safe" or s["in_features"] % 16 or s["out_features"] % 16:
            continue
        safe = [r for r in candidates if s["recipe_verdicts"].get(r, {}).get("verdict") == "safe"]
        if safe:
            out[s["fqn"]] = min(safe, key=lambda r: max([e["ci_hi"] for e in s["errors"][r].values() if e["n"] > 0],
                                                        default=float("inf")))
    return out


def convert_safe_sites(model: nn.Module, recipes: dict[str, str]) -> dict[str, str]:
    """Convert each site of ``recipes`` with its recipe; returns {fqn: reason} of sites left in bf16."""

    skipped: dict[str, str] = {}
    for recipe in sorted(set(recipes.values())):
        chosen = {f for f, r in recipes.items() if r == recipe}
        result = convert(model, recipe, module_filter_fn=lambda m, fqn, chosen=chosen: fqn in chosen)
        skipped.update({f: why for f, why in result.skipped.items() if f in chosen})
    return skipped


def modelled_speedup(plan, recipes: dict[str, str], kernel: str = "scaled_mm") -> float | None:
    """Expected GEMM speedup (H100 speed model) of converting ``recipes`` instead of following ``plan``."""

    bf16 = fp8 = 0.0
    for sp in plan.sites:
        recipe = recipes.get(sp.fqn)
        t = time_site((sp.m, sp.in_features, sp.out_features), [recipe] if recipe else [], model=H100_SXM,
                      kernels=[kernel], gemms=tuple(sp.gemms))
        timed = {e.gemm: e.median_ms for e in t.entries}
        bf16 += sum(t.bf16_ms.values())
        fp8 += sum(timed.get(gemm, ms) for gemm, ms in t.bf16_ms.items())
    return bf16 / fp8 if fp8 > 0 else None


def choose_fp8(model: nn.Module, plan, report, keep: dict[str, str], mode: str, sample=None,
               target: str | None = None) -> Fp8Choice:
    """Convert ``model`` in place: by the plan (its norm+quantize producers fused on ``sample``), or
    (``mode`` "safe-sites", or "auto" with an all-bf16 plan) every accuracy-safe site; returns what was done."""

    if mode == "plan" or (mode == "auto" and plan.totals()["fp8_gemms"] > 0):
        result = apply_plan(model, plan)
        print(f"FP8 model = the plan: {len(result.converted)} sites converted, {len(result.skipped)} kept in bf16")
        if sample is not None and any(s.producer == "norm_quant" for s in plan.sites):
            fused = apply_producers(model, plan, sample)
            print(f"  {len(fused.changes)} norm+quantize producers fused (the norm emits the FP8 input)"
                  + "".join(f"\n  {fqn}: not fused ({why})" for fqn, why in fused.skipped))
        return Fp8Choice("plan", {f: "plan" for f in result.converted}, plan.totals()["speedup"])
    recipes = safe_site_recipes(report, keep, target)
    skipped = convert_safe_sites(model, recipes)
    recipes = {f: r for f, r in recipes.items() if f not in skipped}
    speedup = modelled_speedup(plan, recipes)
    sp = "-" if speedup is None else f"{speedup:.2f}x"
    why = ("the plan keeps every site in bf16" if mode == "auto" else "--fp8 safe-sites")
    note = (f"{why}, so to show FP8's effect on NE the FP8 model converts every accuracy-safe site the "
            f"keep-in-hp policy allows ({len(recipes)} sites, tensorwise/rowwise). This is NOT the plan: the "
            f"H100 speed model expects these GEMMs {sp} as fast as bf16 (slower), which is why the plan left them.")
    print(f"FP8 model = accuracy-safe sites: {note}")
    for fqn, why_skip in skipped.items():
        print(f"  {fqn}: left in bf16 ({why_skip})")
    return Fp8Choice("safe-sites", recipes, speedup, note)
