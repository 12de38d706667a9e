"""A self-contained HTML page for a ProbeReport: the summary, the next steps, the table and plots.

Plots are embedded as base64 PNGs so the page is one file that can be attached to a
review or a CI run. matplotlib runs with the Agg backend (no display needed). Every plot
has a caption that says what it leaves out and how values a log axis cannot show (a lower
bound of 0, an unbounded interval, a non-finite error) are drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re

from loka.formats import E4M3, E5M2
from loka.probe.error import deciding_gemm
from loka.probe.reader import speed_timings, speedup

# Beyond this many sites the histogram grid is cut (the caption names the sites left out).
MAX_HIST_SITES = 60
ROLE_COLORS = {"input": "C0", "weight": "C1", "grad_output": "C2"}


def _pyplot():
    import matplotlib  # heavy: matplotlib, on first use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, on first use

    return plt


def _png(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _worst_ratio(site: dict, recipe: str) -> tuple[float, float, float] | None:
    """(mean, lo, hi) of error / threshold for the GEMM ``recipe``'s verdict rests on (the table's)."""
    gemms = site["errors"].get(recipe, {})
    g = deciding_gemm(gemms)
    if g is None:
        return None
    e = gemms[g]
    t = e["threshold"]
    return e["mean"] / t, e["ci_lo"] / t, e["ci_hi"] / t


def _speedup_of(site: dict, recipe: str) -> float | None:
    return speedup(speed_timings(site), recipe)


def _log_range(values: list[float]) -> tuple[float, float]:
    """Limits of a log axis that show every finite positive value and 1 (the threshold / bf16)."""
    pos = [v for v in values if math.isfinite(v) and v > 0] + [1.0]
    return min(pos) / 2, max(pos) * 2


# The error-vs-speed scatter is drawn only when the speedups spread wider than this (max / min):
# at one shape class (every site predicted 0.20x) it would be one column that says nothing.
MIN_SPEED_SPREAD = 1.1


def error_vs_speedup(report) -> tuple[str, str]:
    """Scatter of error/threshold vs speedup per site and recipe over shaded safe/fast regions;
    ("", why) when the speedups do not spread (untimed, or all alike)."""
    points = {r: [(_speedup_of(s, r), _worst_ratio(s, r)) for s in report.sites] for r in report.recipes()}
    points = {r: [(sp, w[0]) for sp, w in pts if w is not None] for r, pts in points.items()}
    speeds = [sp for pts in points.values() for sp, _ in pts if sp is not None and sp > 0]
    if not speeds:
        return "", ("No error-vs-speed plot: no site has a timing or a speed-model prediction "
                    "(time the sites on the GPU, or plan with --speed-model h100).")
    if max(speeds) / min(speeds) < MIN_SPEED_SPREAD:
        return "", (f"No error-vs-speed plot: every site x recipe has the same speedup "
                    f"({min(speeds):.2f}x-{max(speeds):.2f}x), so it would be one column; the table's speedup column "
                    "and the error plot below carry the information.")
    plt = _pyplot()
    ys = [y for pts in points.values() for _, y in pts]
    lo, hi = _log_range(ys)
    timed = any(sp is not None for pts in points.values() for sp, _ in pts)
    xs = [sp for pts in points.values() for sp, _ in pts if sp is not None] + [1.0]
    x0, x1 = min(xs) * 0.8, max(xs) * 1.25
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ax.fill_between([1.0, x1], lo, 1.0, color="green", alpha=0.08, lw=0, label="safe & fast region")
    ax.fill_between([x0, 1.0], 1.0, hi, color="red", alpha=0.08, lw=0, label="unsafe & slow region")
    edge = 0
    for j, (recipe, pts) in enumerate(points.items()):
        px = [sp if sp is not None else 1.0 for sp, _ in pts]
        py = [min(max(y, lo), hi) if not math.isnan(y) else hi for _, y in pts]
        edge += sum(not (lo <= y <= hi) for _, y in pts)
        ax.scatter(px, py, label=recipe, alpha=0.7, color=f"C{j}", s=24)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xlim=(x0, x1), ylim=(lo, hi), yscale="log", title="FP8 error vs speed per site")
    modeled = any(s.get("speed_source") == "model" for s in report.sites)
    ax.set_xlabel("speedup vs bf16 (fastest kernel" + (", speed model where not timed on a GPU" if modeled else "")
                  + ")" + ("" if timed else " — not timed, shown at 1"))
    ax.set_ylabel("mean error / threshold (GEMM the verdict rests on)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    n = sum(len(p) for p in points.values())
    caption = f"{n} points: every site × recipe with a measured error."
    if edge:
        caption += f" {edge} non-finite or zero error(s) are drawn on the plot's edge."
    untimed = sum(sp is None for pts in points.values() for sp, _ in pts)
    if untimed:
        caption += f" {untimed} point(s) without a timing or speed model are drawn at speedup 1."
    return _png(fig), caption


def _bar_rows(report) -> list[tuple[int, int, tuple[float, float, float]]]:
    rows = []
    for i, s in enumerate(report.sites):
        for j, recipe in enumerate(report.recipes()):
            r = _worst_ratio(s, recipe)
            if r is not None:
                rows.append((i, j, r))
    return rows


def error_bars(report) -> tuple[str, str]:
    """Per-site error/threshold with its confidence interval, one row per recipe; bounds a log axis
    cannot show (0, inf) end in an arrow at the plot's edge."""
    plt = _pyplot()
    sites, recipes = report.sites, report.recipes()
    rows = _bar_rows(report)
    lo_ax, hi_ax = _log_range([v for _, _, r in rows for v in r])
    step = 0.8 / max(len(recipes), 1)
    fig, ax = plt.subplots(figsize=(8.5, 0.16 * len(sites) * max(len(recipes), 2) + 1.5))
    arrows = {"lo": 0, "hi": 0, "mean": 0}
    for i, j, (mean, lo, hi) in rows:
        y = i + (j - (len(recipes) - 1) / 2) * step
        a = min(max(lo, lo_ax), hi_ax) if not math.isnan(lo) else lo_ax
        b = min(hi, hi_ax) if math.isfinite(hi) else hi_ax
        ax.plot([a, b], [y, y], color=f"C{j}", lw=1.2)
        if lo < lo_ax:
            arrows["lo"] += 1
            ax.plot([lo_ax], [y], "<", color=f"C{j}", ms=5, clip_on=False)
        if not hi <= hi_ax:
            arrows["hi"] += 1
            ax.plot([hi_ax], [y], ">", color=f"C{j}", ms=5, clip_on=False)
        if not math.isfinite(mean):
            arrows["mean"] += 1
        m = min(max(mean, lo_ax), hi_ax) if not math.isnan(mean) else hi_ax
        ax.plot([m], [y], "o", color=f"C{j}", ms=4)
    for j, recipe in enumerate(recipes):
        ax.plot([], [], "o-", color=f"C{j}", label=recipe, ms=4)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlim=(lo_ax, hi_ax), ylim=(len(sites) - 0.5, -0.5))
    ax.set_yticks(range(len(sites)), [s["fqn"] for s in sites], fontsize=7)
    ax.set_xlabel("mean error / threshold, with confidence interval (GEMM the verdict rests on)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    missing = [s["fqn"] for i, s in enumerate(sites) if not any(r[0] == i for r in rows)]
    caption = f"All {len(sites)} sites."
    if arrows["lo"]:
        caption += (f" ◀ on the left edge ({arrows['lo']}): the interval's lower bound is below the axis, "
                    "down to 0 (a relative error is never negative; a log axis cannot show 0).")
    if arrows["hi"]:
        caption += f" ▶ on the right edge ({arrows['hi']}): the upper bound is beyond the axis or unbounded (too few observations)."
    if arrows["mean"]:
        caption += f" {arrows['mean']} non-finite error(s) (NaN/Inf operands) are drawn at the right edge."
    if missing:
        caption += f" No error measured (site never ran on a sampled step): {', '.join(missing)}."
    return _png(fig), caption


def histograms(report) -> tuple[str, str]:
    """log2-magnitude histograms of each site's operands, with the FP8 dynamic ranges."""
    plt = _pyplot()
    with_ops = [s for s in report.sites if s["operands"]]
    sites = with_ops[:MAX_HIST_SITES]
    never = [s["fqn"] for s in report.sites if not s["operands"]]
    cut = [s["fqn"] for s in with_ops[MAX_HIST_SITES:]]
    caption = f"{len(sites)} of {len(report.sites)} sites."
    if never:
        caption += f" Not drawn, never ran on a sampled step: {', '.join(never)}."
    if cut:
        caption += f" Not drawn, beyond the first {MAX_HIST_SITES}: {', '.join(cut)}."
    if not sites:
        return "", caption
    cols = 3
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.3 * rows + 0.6), squeeze=False)
    for ax, s in zip(axes.flat, sites):
        for role, st in s["operands"].items():
            h = st["log2_hist"]
            xs = [h["log2_min"] + i for i in range(len(h["counts"]))]
            total = max(sum(h["counts"]), 1)
            ax.step(xs, [c / total for c in h["counts"]], where="mid", lw=1, color=ROLE_COLORS.get(role, "C3"))
        ax.set_title(s["fqn"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(sites):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=r) for r, c in ROLE_COLORS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.supxlabel(f"floor(log2 |x|)  (e4m3 spans {math.log2(E4M3.min_subnormal):.0f}..{math.log2(E4M3.max):.1f}, "
                  f"e5m2 {math.log2(E5M2.min_subnormal):.0f}..{math.log2(E5M2.max):.1f} after scaling)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (2.3 * rows + 0.6)))
    return _png(fig), caption


def _inline(text: str) -> str:
    """Escape, then the two Markdown marks the report's notes use: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)


def _md_to_html(md: str) -> str:
    """The report's Markdown (notes, a numbered list, one table) as HTML."""
    out, in_list, in_table = [], False, False
    for line in md.splitlines()[1:]:
        if in_list and not re.match(r"\d+\. ", line):
            out.append("</ol>")
            in_list = False
        if in_table and not line.startswith("|"):  # a report has several tables (the headroom section's)
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            if line.startswith("|---"):
                continue
            tag = "td" if in_table else "th"
            if not in_table:
                out.append("<table>")
                in_table = True
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        elif re.match(r"\d+\. ", line):
            if not in_list:
                out.append("<ol>")
                in_list = True
            out.append(f"<li>{_inline(line.split('. ', 1)[1])}</li>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
    out += ["</ol>"] if in_list else []
    out += ["</table>"] if in_table else []
    return "\n".join(out)


def render_html(report, json_path=None) -> str:
    figures = [("FP8 error vs speed", error_vs_speedup(report)),
               ("Error per site with confidence interval", error_bars(report)),
               ("Operand magnitude histograms", histograms(report))]
    body = []
    for title, (b64, caption) in figures:
        body.append(f"<h2>{html.escape(title)}</h2>")
        if b64:
            body.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'/>")
        body.append(f"<p class='caption'>{html.escape(caption)}</p>")
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px} th{background:#eee} img{max-width:100%}"
             ".caption{color:#444;font-size:13px;max-width:60em}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>loka probe report</title>"
            f"<style>{style}</style></head><body><h1>loka probe report</h1>\n"
            + _md_to_html(report.to_markdown(json_path)) + "\n" + "\n".join(body) + "</body></html>\n")
