"""A self-contained HTML page for a ProbeReport: the summary table and matplotlib plots.

Plots are embedded as base64 PNGs so the page is one file that can be attached to a
review or a CI run. matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math

from loka.formats import E4M3, E5M2
from loka.probe.reader import speed_timings, speedup

MAX_HIST_SITES = 12


def _png(fig) -> str:
    import matplotlib.pyplot as plt  # heavy: matplotlib, on first use

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _worst_ratio(site: dict, recipe: str) -> tuple[float, float, float] | None:
    """(mean, lo, hi) of error / threshold for the worst measured GEMM of ``recipe``."""
    gemms = [e for e in site["errors"].get(recipe, {}).values() if e["n"] > 0]
    if not gemms:
        return None
    e = max(gemms, key=lambda e: e["mean"] / e["threshold"])
    t = e["threshold"]
    return e["mean"] / t, e["ci_lo"] / t, e["ci_hi"] / t


def _speedup_of(site: dict, recipe: str) -> float | None:
    return speedup(speed_timings(site), recipe)


def error_vs_speedup(report) -> str:
    """Scatter of error/threshold vs speedup per site and recipe, with safe/fast quadrants."""
    import matplotlib  # heavy: matplotlib, on first use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, on first use

    fig, ax = plt.subplots(figsize=(7.5, 5))
    any_timing = False
    for recipe in report.recipes():
        xs, ys = [], []
        for s in report.sites:
            r = _worst_ratio(s, recipe)
            if r is None or not math.isfinite(r[0]):
                continue
            sp = _speedup_of(s, recipe)
            any_timing |= sp is not None
            xs.append(sp if sp is not None else 1.0)
            ys.append(max(r[0], 1e-3))
        ax.scatter(xs, ys, label=recipe, alpha=0.7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    modeled = any(s.get("speed_source") == "model" for s in report.sites)
    ax.set_xlabel("speedup vs bf16 (fastest kernel" + (", speed model where not timed on a GPU" if modeled else "")
                  + ")" + ("" if any_timing else " — not timed, shown at 1"))
    ax.set_ylabel("mean error / threshold (worst GEMM)")
    ax.text(0.98, 0.02, "safe & fast", transform=ax.transAxes, ha="right", va="bottom", color="green")
    ax.text(0.02, 0.98, "unsafe & slow", transform=ax.transAxes, ha="left", va="top", color="red")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title("FP8 error vs speed per site")
    return _png(fig)


def error_bars(report) -> str:
    """Per-site worst-GEMM error/threshold with its confidence interval, one marker per recipe."""
    import matplotlib  # heavy: matplotlib, on first use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, on first use

    sites = report.sites
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(sites) + 1.5))
    recipes = report.recipes()
    for j, recipe in enumerate(recipes):
        for i, s in enumerate(sites):
            r = _worst_ratio(s, recipe)
            if r is None or not math.isfinite(r[0]):
                continue
            lo = max(r[1], 1e-3) if math.isfinite(r[1]) else 1e-3
            hi = r[2] if math.isfinite(r[2]) else r[0] * 10
            y = i + (j - len(recipes) / 2) * 0.15
            ax.plot([lo, hi], [y, y], color=f"C{j}", lw=1)
            ax.plot([max(r[0], 1e-3)], [y], "o", color=f"C{j}", label=recipe if i == 0 else None, ms=4)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(sites)), [s["fqn"] for s in sites], fontsize=7)
    ax.set_xlabel("mean error / threshold, with CI (worst GEMM)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def histograms(report) -> str:
    """log2-magnitude histograms of each site's operands, with the FP8 dynamic ranges."""
    import matplotlib  # heavy: matplotlib, on first use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, on first use

    sites = [s for s in report.sites if s["operands"]][:MAX_HIST_SITES]
    if not sites:
        return ""
    cols = 3
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, sites):
        for role, st in s["operands"].items():
            h = st["log2_hist"]
            xs = [h["log2_min"] + i for i in range(len(h["counts"]))]
            total = max(sum(h["counts"]), 1)
            ax.step(xs, [c / total for c in h["counts"]], where="mid", label=role, lw=1)
        ax.set_title(s["fqn"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(sites):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel(f"floor(log2 |x|)  (e4m3 spans {math.log2(E4M3.min_subnormal):.0f}..{math.log2(E4M3.max):.1f}, "
                  f"e5m2 {math.log2(E5M2.min_subnormal):.0f}..{math.log2(E5M2.max):.1f} after scaling)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _md_table_to_html(md: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|---")]
    out = ["<table>"]
    for i, row in enumerate(rows):
        tag = "th" if i == 0 else "td"
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    out.append("</table>")
    notes = [f"<p>{html.escape(line)}</p>" for line in md.splitlines()[1:] if line and not line.startswith(("|", "#"))]
    return "\n".join(notes + out)


def render_html(report) -> str:
    imgs = [("FP8 error vs speed", error_vs_speedup(report)), ("Error per site with confidence interval", error_bars(report)),
            ("Operand magnitude histograms", histograms(report))]
    body = [f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'/>" for t, b in imgs if b]
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px} th{background:#eee}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>loka probe report</title>"
            f"<style>{style}</style></head><body><h1>loka probe report</h1>"
            + _md_table_to_html(report.to_markdown()) + "\n".join(body) + "</body></html>\n")
