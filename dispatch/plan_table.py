"""The plan summary table printed by ``loka plan`` (Markdown, readable as plain text).

Three modules carry "plan" in their name, one role each: ``planner`` *chooses* a plan from
a report, ``plans`` is the plan *file* (``Plan``, its JSON and validation), and this one
*renders* a Plan for people.
"""

from __future__ import annotations

from loka.recipe import GEMMS


def _cell(choice) -> str:
    if not choice.is_fp8:
        return "bf16"
    return f"{choice.kernel}/{choice.recipe}"


def _fmt_speedup(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def plan_table(plan) -> str:
    """One row per site: shape, choice per GEMM, expected speedup, and why; then totals and notes."""
    t = plan.totals()
    dev = plan.device or {}
    target = f", for {dev['target']} ({dev['arch']})" if dev.get("target") else ""
    lines = [
        f"# loka plan ({len(plan.sites)} sites{target}, device: {dev.get('name', 'unknown')}, solver: {plan.solver})",
        "",
    ]
    if dev.get("source") == "model":
        lines += ["Timings are **predicted** by a GPU speed model, not measured: speedups below rank kernels, "
                  "they are not measurements.", ""]
    elif dev and not dev.get("representative", True):
        lines += ["Timings are **not representative** (taken on CPU): speedups below say nothing about GPU speed.", ""]
    lines += ["| site | M×K×N | fprop | dgrad | wgrad | speedup | why |", "|---|---|---|---|---|---|---|"]
    for s in plan.sites:
        cells = " | ".join(_cell(s.gemms[g]) for g in GEMMS)
        why = "; ".join(f"{g}: {s.gemms[g].reason}" for g in GEMMS)
        lines.append(f"| {s.fqn} | {s.m}×{s.in_features}×{s.out_features} | {cells} | "
                     f"{_fmt_speedup(s.expected_speedup())} | {why} |")
    budget = plan.budget or {}
    lines += [
        "",
        f"Total: {t['fp8_gemms']} of {3 * len(plan.sites)} GEMMs in FP8; GEMM time {t['bf16_ms']:.4g} ms -> "
        f"{t['planned_ms']:.4g} ms per step (expected speedup {_fmt_speedup(t['speedup'])}); "
        f"model error {t['error_cost']:.3g} of budget {budget.get('max_model_ne_delta', float('nan')):.3g} (relative NE).",
    ]
    if plan.step:
        st = plan.step
        lines.append(f"Predicted training step: bf16 {st['bf16_step_ms']:.4g} ms ({st['source']}) -> "
                     f"{st['planned_step_ms']:.4g} ms, speed-up {st['speedup']:.2f}x (the GEMM time saved above; "
                     "the rest of the step unchanged).")
    else:
        lines.append("Predicted training step: not stated (give the measured bf16 step to loka plan --bf16-step-ms MS).")
    lines += [f"Note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"
