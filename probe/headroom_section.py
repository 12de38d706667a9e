"""The FP8 headroom section of a report: what FP8 can buy this model, and what to change to buy more.

The figures come from ``loka.dispatch.headroom_estimate`` (a layer above this one) as its JSON
document, which a report carries under ``"headroom"``; this file only renders it, so the probe
report, ``loka headroom`` and ``loka plan`` print the same text. Bands read ``low-high``: the low
end counts only GEMMs whose speed the device's measured region covers, the high end also the
extrapolated ones.
"""

from __future__ import annotations

REGIME_NAMES = {"per_call": "per-call casts", "producers": "producers loka has here",
                "prequantized": "every operand pre-quantized", "all_producers": "a producer at every fprop and dgrad"}


def band(b: dict, fmt: str = "{:.3f}x") -> str:
    """``1.152x`` when both ends agree, else ``1.119x-1.149x``."""
    lo, hi = fmt.format(b["low"]), fmt.format(b["high"])
    return lo if lo == hi else f"{lo}-{hi}"


def _ms(b: dict) -> str:
    return band(b, "{:.2f}")


def _regime_rows(doc: dict) -> list[str]:
    rows = ["| regime | GEMM time saved, ms | GEMM + attention bound | step speed-up | FP8 GEMMs (extrapolated) |",
            "|---|---|---|---|---|"]
    for name, r in doc["regimes"].items():
        rows.append(f"| {REGIME_NAMES.get(name, name)} | {_ms(r['saved_ms'])} | {band(r['bound'])} | {band(r['step'])} "
                    f"| {r['fp8_gemms']} of {r['gemms']} ({r['extrapolated_gemms']}) |")
    return rows


def _arch_rows(doc: dict) -> list[str]:
    regimes = list(doc["regimes"])
    rows = ["| arch | bf16 GEMM ms | " + " | ".join(f"saved, {REGIME_NAMES.get(r, r)}" for r in regimes) + " |",
            "|---|---|" + "---|" * len(regimes)]
    for arch, v in doc["regimes"][regimes[0]]["by_arch"].items():
        cells = [_ms({"low": doc["regimes"][r]["by_arch"][arch]["saved_low_ms"],
                      "high": doc["regimes"][r]["by_arch"][arch]["saved_high_ms"]}) for r in regimes]
        rows.append(f"| {arch} | {v['bf16_ms']:.2f} | " + " | ".join(cells) + " |")
    return rows


def _lever_rows(doc: dict, limit: int) -> list[str]:
    rows = ["| lever | modelled gain, ms of the step | what | loka has |", "|---|---|---|---|"]
    for lv in doc["levers"][:limit]:
        rows.append(f"| {lv['lever']} | {_ms(lv['gain_ms'])} ({lv['step_share']:.1%}) | {lv['what']}: {lv['detail']} "
                    f"| {lv['loka_has']} |")
    if len(doc["levers"]) > limit:
        rows.append(f"| ... | | {len(doc['levers']) - limit} smaller levers in the JSON | |")
    return rows


def headroom_summary(doc: dict) -> str:
    """One line: the producers regime's bound and step speed-up, and what a plan captures."""
    p = doc["regimes"]["producers"]
    line = (f"FP8 headroom on the {doc['device_model']}: GEMM + attention bound {band(doc['regimes']['per_call']['bound'])} "
            f"with per-call casts, {band(p['bound'])} with the producers loka has, "
            f"{band(doc['regimes']['prequantized']['bound'])} pre-quantized; step {band(p['step'])}")
    cap = doc.get("captured")
    if cap:
        line += f"; this plan captures {band(cap['share_of_bound'], '{:.0%}')} of the producers regime's saving"
    return line


def headroom_markdown(doc: dict | None, level: int = 2, max_levers: int = 12) -> list[str]:
    """The section's Markdown lines (none when ``doc`` is None)."""
    if not doc:
        return []
    h = "#" * level
    step = doc["step"]
    a = doc["assumptions"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in step["parts_ms"].items() if k != "elementwise_fused")
    lines = [f"{h} FP8 headroom: {doc['model']} on {doc['device_model']}", "",
             headroom_summary(doc) + ".", "",
             f"bf16 step {step['bf16_ms']:.2f} ms ({step['source']}); parts, ms (model): {parts}.",
             f"Assumptions: attention at {a['attention_efficiency']:.0%} of the bf16 peak; "
             f"{len(a['producers'])} producer site(s) ({', '.join(sorted(set(a['producers'].values()))) or 'none'}); "
             + (f"FP8 only at K, N >= {a['min_width']}; " if a["min_width"] else "FP8 wherever the model has it faster; ")
             + ("serving: a forward, fprop only, FP8 weights frozen once." if a.get("serving") else
                f"a training step; checkpoint recompute {'priced' if a['recompute'] else 'left out'}."),
             "Every figure is the speed model's (not measured); a band's low end counts only calibrated GEMMs "
             "(inside the measured region: " + "; ".join(doc["calibration"]) + "), its high end extrapolated ones too.",
             "", *_regime_rows(doc), "", f"{h}# Per arch (ms saved)", "", *_arch_rows(doc), "",
             f"{h}# What to change, largest modelled gain first", "", *_lever_rows(doc, max_levers)]
    if doc.get("notes"):
        lines += ["", *(f"- {n}" for n in doc["notes"])]
    return lines + [""]


def with_headroom(report, doc: dict):
    """A copy of probe ``report`` carrying the headroom document ``doc`` (its Markdown and HTML show it)."""
    if not isinstance(doc, dict) or doc.get("kind") != "loka.headroom":
        raise ValueError("with_headroom takes the document of loka.dispatch.headroom_estimate.estimate_headroom")
    return type(report)({**report.doc, "headroom": doc})
