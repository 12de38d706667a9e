"""The summary ``loka demo`` ends with: what a model owner reads after the stages scroll by.

Per site: shape, the probe's verdict, the plan's kernels and why, and what the trained FP8
model ran there. Then expected speedup (the plan's and, when it differs, the FP8 model's)
next to the measured one, NE bf16 vs FP8 per task with its paired interval and (when the
gate cannot decide) how many held-out examples would, the gate's verdict, the served
requests, where the files are, and how long each stage took.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from loka.probe.headroom_section import headroom_summary
from loka.recipe import GEMMS


def _plan_cell(sp) -> str:
    cells = {g: (f"{c.kernel}/{c.recipe}" if c.is_fp8 else "bf16") for g, c in sp.gemms.items()}
    if len(set(cells.values())) == 1:
        return next(iter(cells.values()))
    return " ".join(f"{g}={cells[g]}" for g in GEMMS)


def _why(sp) -> str:
    """The site's plan reason, once when every GEMM shares it (policy, speed), else per GEMM."""
    reasons = [sp.gemms[g].reason for g in GEMMS]
    if all(r.startswith("kept bf16 by policy") for r in reasons):
        return reasons[0]
    if all("no FP8 kernel faster than bf16" in r for r in reasons):
        best = list(dict.fromkeys(r.split("(best ", 1)[1].rstrip(")") for r in reasons if "(best " in r))
        return ("kept bf16: no FP8 kernel faster than bf16 here, quantization included"
                + (f" (best per GEMM: {', '.join(best)})" if best else ""))
    return "; ".join(f"{g}: {r}" for g, r in zip(GEMMS, reasons))


def summary_rows(report, plan, fp8) -> list[dict]:
    """One row per planned site: shape, probe verdict + reason, chosen kernels, expected speedup, trained FP8."""
    probed = {s["fqn"]: s for s in report.sites}
    rows = []
    for sp in plan.sites:
        site = probed.get(sp.fqn, {})
        trained = fp8.sites.get(sp.fqn)
        rows.append({
            "site": sp.fqn,
            "shape": f"{sp.m}x{sp.in_features}x{sp.out_features}",
            "probe": site.get("verdict", "?") + (f" ({site['best_recipe']})" if site.get("best_recipe") else ""),
            "probe_reason": site.get("reason", ""),
            "plan": _plan_cell(sp),
            "why": _why(sp),
            "speedup": sp.expected_speedup(),
            "fp8_model": _trained_cell(trained, site.get("best_recipe")),
        })
    return rows


def _trained_cell(trained: str | None, probe_pick: str | None) -> str:
    """What the FP8 model ran at a site, and why when it is not the recipe the probe lists."""
    if trained is None:
        return "bf16"
    if trained == "plan":
        return "plan"
    if probe_pick and trained != probe_pick:
        return (f"FP8 {trained} (its lowest-error safe recipe on torch._scaled_mm; "
                f"the probe lists {probe_pick}, its fastest safe one)")
    return f"FP8 {trained}"


def format_summary(rows: list[dict]) -> str:
    """Two lines a site: shape, probe verdict, plan kernels, expected speedup, what trained; then the plan's why."""
    w = max(len(r["site"]) for r in rows) + 1
    p = max([len(r["probe"]) for r in rows] + [len("probe")]) + 1
    k = max([len(r["plan"]) for r in rows] + [len("plan kernels")]) + 1
    lines = [f"{'site':<{w}} {'M x K x N':<14} {'probe':<{p}} {'plan kernels':<{k}} {'exp.':>6}  FP8 model trained"]
    for r in rows:
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['site']:<{w}} {r['shape']:<14} {r['probe']:<{p}} {r['plan']:<{k}} {sp:>6}  {r['fp8_model']}")
        lines.append(f"{'':<{w}}   why: {r['why']}")
    return "\n".join(lines)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def speed_lines(cfg, plan, fp8, runs) -> tuple[list[str], float]:
    bf16_run, fp8_run = runs
    measured = bf16_run.wall_s / fp8_run.wall_s
    source = "H100 speed model" if cfg.device == "cpu" else "timed on this GPU"
    lines = [f"expected GEMM speedup of the plan ({source}): {_x(plan.totals()['speedup'])}"]
    if fp8.kind != "plan":
        lines.append(f"expected GEMM speedup of the trained FP8 model (accuracy-safe sites, H100 speed model): "
                     f"{_x(fp8.expected_speedup)}; it is not the plan")
    tail = " (CPU: FP8 is emulated here; not representative of GPU speed)" if cfg.device == "cpu" else ""
    lines.append(f"measured training speed, FP8 model / bf16, {cfg.continue_steps} steps each: {measured:.2f}x{tail}")
    return lines, measured


def ne_lines(gate_result, eval_examples: int) -> list[str]:
    lines = []
    for c in gate_result.checks:
        if c.kind != "model" or not c.name.startswith("ne"):
            continue
        line = (f"{c.name} bf16 {c.baseline:.5f} -> FP8 {c.candidate:.5f}: {c.estimate:+.4%} "
                f"[{c.ci_lo:+.4%}, {c.ci_hi:+.4%}] (budget {c.budget}): {c.verdict}")
        if c.verdict == "inconclusive" and c.n_needed:
            line += (f"; the interval straddles the budget: about {c.n_needed:,} held-out examples would decide "
                     f"(now {eval_examples:,}; --eval-examples)")
        lines.append(line)
    meaning = {"pass": "FP8 stays within the NE budget on every task",
               "regression": "FP8 costs more NE than the budget allows on some task: do not ship this FP8 model",
               "inconclusive": "the held-out set is too small to tell; evaluate on more examples",
               "identical": "FP8 and bf16 predicted exactly the same: nothing ran in FP8"}
    lines.append(f"gate: {gate_result.verdict} ({meaning.get(gate_result.verdict, '')}; details in gate.json). "
                 "The intervals cover the held-out sample only, not run-to-run training variation.")
    return lines


def effect_line(cfg, plan, fp8, gate_result) -> str:
    """FP8's effect in one sentence: what ran in FP8, its expected speed, and what the NE interval allows."""
    what = "the plan" if fp8.kind == "plan" else "every accuracy-safe site, not the plan"
    n = len(fp8.sites)
    if n == 0:
        return "FP8's effect: nothing ran in FP8, so there is no effect to show."
    where = "H100 speed model" if cfg.device == "cpu" else "timed on this GPU"
    speed = fp8.expected_speedup if fp8.kind != "plan" else plan.totals()["speedup"]
    pace = "-" if speed is None else f"{speed:.2f}x ({'faster' if speed > 1 else 'slower'} than bf16, {where})"
    ne = [c for c in gate_result.checks if c.kind == "model" and c.name.startswith("ne")]
    worst = max(ne, key=lambda c: c.ci_hi) if ne else None
    if worst is None:
        quality = "no NE check ran"
    elif gate_result.verdict == "pass":
        quality = f"NE within budget on every task (worst upper bound {worst.ci_hi:+.4%} on {worst.name})"
    elif gate_result.verdict == "regression":
        quality = f"NE worse than the budget allows ({worst.name} {worst.estimate:+.4%}, CI [{worst.ci_lo:+.4%}, {worst.ci_hi:+.4%}])"
    else:
        quality = (f"NE inconclusive: {worst.name} {worst.estimate:+.4%}, CI [{worst.ci_lo:+.4%}, {worst.ci_hi:+.4%}] "
                   f"straddles the budget {worst.budget} on this held-out set")
    return f"FP8's effect ({n} sites in FP8: {what}): GEMM speed {pace}; {quality}."


def print_summary(cfg, out: Path, *, report, plan, plan_path, fp8, runs, gate_result, served, report_paths,
                  stages, headroom: dict | None = None) -> dict:
    """Print the end-of-demo summary and write it to ``out/summary.json``; returns it."""
    print(f"\n=== summary {'=' * 64}")
    rows = summary_rows(report, plan, fp8)
    print(format_summary(rows))
    if fp8.note:
        print(f"\nnote: {fp8.note}")
    speed, measured = speed_lines(cfg, plan, fp8, runs)
    print("\n" + "\n".join(speed))
    print("\n".join(ne_lines(gate_result, cfg.eval_examples)))
    print(effect_line(cfg, plan, fp8, gate_result))
    if headroom:  # loka.dispatch.headroom_estimate: what FP8 could buy the whole step, and what the plan takes
        print(headroom_summary(headroom) + " (levers: the probe report's FP8 headroom section)")
    lat = sorted(served["latency_ms"])
    print(f"served {len(lat)} requests of 64 candidates from the FP8 model: median {lat[len(lat) // 2]:.1f} ms")
    html = report_paths.get("html")
    print(f"\nprobe report (HTML): {html}\nplan: {plan_path}\ngate: {out / 'gate.json'}\nsummary: "
          f"{out / 'summary.json'}")
    print("time per stage: " + ", ".join(f"{t.split('.')[0]}. {s:.0f} s" for t, s in stages.items())
          + f"; total {sum(stages.values()) / 60:.1f} min")
    summary = {
        "config": asdict(cfg),
        "sites": rows,
        "plan_totals": plan.totals(),
        "fp8_model": {"kind": fp8.kind, "sites": fp8.sites, "expected_speedup": fp8.expected_speedup,
                      "note": fp8.note},
        "measured_train_speedup": measured,
        "representative": cfg.device == "cuda",
        "gate": gate_result.to_dict(),
        "serve": served,
        "stage_seconds": stages,
        "headroom": headroom,
        "paths": {"report_html": str(html), "plan": str(plan_path)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
