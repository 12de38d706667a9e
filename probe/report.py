"""ProbeReport: what a probe learned, as versioned JSON, a Markdown table and an HTML page.

The JSON document is the contract with the planner (loka.dispatch); its schema lives in
:mod:`loka.probe.schema` and is documented field by field in docs/probe.md.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loka.jsonio import decode_floats, encode_floats, loads, read_json
from loka.probe.error import deciding_gemm
from loka.probe.headroom_section import headroom_markdown
from loka.probe.html import render_html
from loka.probe.schema import ReportSchemaError, validate


@dataclass
class ProbeReport:
    """A validated probe report document (``doc`` follows the schema)."""

    doc: dict

    def __post_init__(self) -> None:
        validate(encode_floats(self.doc))

    # ---- access -------------------------------------------------------------------------
    @property
    def sites(self) -> list[dict]:
        return self.doc["sites"]

    def site(self, fqn: str) -> dict:
        for s in self.sites:
            if s["fqn"] == fqn:
                return s
        raise KeyError(f"no site {fqn!r} in the report; sites: {[s['fqn'] for s in self.sites]}")

    def verdicts(self) -> dict[str, str]:
        """fqn -> safe / unsafe / undecided."""
        return {s["fqn"]: s["verdict"] for s in self.sites}

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(encode_floats(self.doc), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ProbeReport":
        """Parse and validate; raises :class:`ReportSchemaError` naming the bad field."""
        doc = loads(text, "probe report", ReportSchemaError)
        validate(doc)
        return cls(decode_floats(doc))

    @classmethod
    def load(cls, path: str | Path) -> "ProbeReport":
        """Read and validate a report file; raises :class:`ReportSchemaError` in one line."""
        doc = read_json(path, "probe report", ReportSchemaError)
        validate(doc)
        return cls(decode_floats(doc))

    def save(self, out_dir: str | Path, stem: str = "probe_report") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.html`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "html": out / f"{stem}.html"}
        paths["json"].write_text(self.to_json())
        paths["md"].write_text(self.to_markdown(paths["json"]))
        paths["html"].write_text(self.to_html(paths["json"]))
        return paths

    # ---- Markdown -----------------------------------------------------------------------
    def recipes(self) -> list[str]:
        seen: list[str] = []
        for s in self.sites:
            for r in s["errors"]:
                if r not in seen:
                    seen.append(r)
        return seen

    def to_markdown(self, json_path: str | Path | None = None) -> str:
        """The bottom line, counts per verdict, the next steps, then a table: site, shape, stats, error
        per recipe with CI, speedup, verdict, reason (a reason several sites share: a label, spelled
        out once under the table). ``json_path``: where this report's JSON is (for the commands the
        next steps print; default ``probe_report.json``)."""
        recipes = self.recipes()
        cfg = self.doc["config"]
        labels, shared = reason_groups(self.sites)
        lines = [
            "# loka probe report",
            "",
            bottom_line(self.sites),
            "",
            f"Sampled steps: {len(self.doc['sampled_steps'])} · confidence {cfg['confidence']:.0%} · "
            f"thresholds (relative GEMM error) {', '.join(f'{g} {t:g}' for g, t in cfg['thresholds'].items())}",
            *target_line(self.doc["meta"], recipes),
            "",
            verdict_counts(self.sites),
            "",
            *next_steps(self, json_path or "probe_report.json"),
            "",
            "Error per recipe: mean relative error [CI low, CI high] of the GEMM the verdict rests on (gemm).",
        ]
        rep = [s["timings"]["representative"] for s in self.sites if s["timings"]]
        if rep and not all(rep):
            lines.append("Timings were taken on CPU: they are **not representative** of GPU speed and decide nothing.")
        modeled = {s["modeled_timings"]["device_name"] for s in self.sites if s.get("modeled_timings")}
        if modeled:
            lines.append(f"Speedups marked (model) are predicted by the {', '.join(sorted(modeled))} "
                         "(FP8 kernel incl. quantization vs bf16), not measured; time the sites on the GPU to replace them.")
        cov = self.doc.get("coverage")
        if cov:
            lines.append(f"GEMM coverage (the first sampled step's GEMMs as they ran): the probed sites hold "
                         f"{cov['probed_share']:.1%} of "
                         f"the step's GEMM FLOPs; loka can convert {cov['convertible_share']:.1%}, "
                         f"{cov['worth_share']:.1%} worth converting. Sites the probe does not measure: "
                         + (", ".join(f"`{r['site']}` {r['kind']} {r['share']:.1%}" for r in cov["sites"] if not r["probed"]) or "none"))
        lines += ["", "| site | M×K×N | input amax / crest / kurt | " + " | ".join(recipes) + " | speedup | verdict | reason |",
                  "|" + "---|" * (len(recipes) + 6)]
        for s in self.sites:
            lines.append(_md_row(s, recipes, labels.get(s["fqn"])))
        for note in shared + alignment_note(self.sites):
            lines += ["", note]
        if self.doc.get("headroom"):  # attached from above (loka.probe.headroom_section.with_headroom)
            lines += ["", *headroom_markdown(self.doc["headroom"])]
        return "\n".join(lines).rstrip("\n") + "\n"

    def to_html(self, json_path: str | Path | None = None) -> str:
        return render_html(self, json_path)


# cuBLASLt's FP8 GEMM takes K and N only in multiples of 16 (the rule loka.dispatch's scaled_mm
# and torchao kernels check); loka.mods.padding pads a Linear to it exactly.
FP8_ALIGN = 16


def _round_up(n: int) -> int:
    return -(-n // FP8_ALIGN) * FP8_ALIGN


def alignment_issue(site: dict) -> str | None:
    """Why cuBLAS FP8 GEMMs refuse this site's shape and the mod that fixes it; None when aligned."""
    k, n = site["in_features"], site["out_features"]
    bad = [f"{d}={v}" for d, v in (("K", k), ("N", n)) if v % FP8_ALIGN]
    if not bad:
        return None
    return (f"{' and '.join(bad)} not a multiple of {FP8_ALIGN}: cuBLAS FP8 GEMMs (scaled_mm) refuse it; "
            f"the padding mod (loka.mods.padding) pads it exactly to K={_round_up(k)}, N={_round_up(n)}")


def _speed_source(sites: list[dict]) -> str:
    """Where the sites' speedups come from, in words."""
    measured = {s["timings"]["device_name"] for s in sites if s.get("speed_source") == "measured"}
    modeled = {s["modeled_timings"]["device_name"] for s in sites if s.get("speed_source") == "model"}
    parts = ([f"timed on {', '.join(sorted(measured))}"] if measured else []) + \
            ([f"predicted by the {', '.join(sorted(modeled))}"] if modeled else [])
    return " and ".join(parts) or "no timing"


def _sites(n: int, be: bool = False) -> str:
    """"1 site", "3 sites" (``be``: "1 site is", "3 sites are")."""
    return f"{n} site" + ("" if n == 1 else "s") + ((" is" if n == 1 else " are") if be else "")


def bottom_line(sites: list[dict]) -> str:
    """One bold line a model owner reads first: will the plan put anything in FP8 at these shapes?"""
    safe = [s for s in sites if s["verdict"] == "safe"]
    fast = [s for s in safe if s["speed"] == "fast"]
    unknown = [s for s in safe if s["speed"] == "unknown"]
    if fast:
        top = max(fast, key=lambda s: s["speedup"])
        text = (f"{len(fast)} of {_sites(len(sites))} are accuracy-safe and faster than bf16 ({_speed_source(fast)}; "
                f"best `{top['fqn']}` {top['speedup']:.2f}x): the plan can put them in FP8")
    elif unknown:
        text = (f"{_sites(len(safe), be=True)} accuracy-safe, {len(unknown)} of them with no timing: plan with `--speed-model "
                "h100` (or time them on the GPU) to learn whether FP8 is faster there")
    elif safe:
        best = max(s["speedup"] for s in safe)
        text = (f"at these shapes the plan will keep everything in bf16: {_sites(len(safe), be=True)} accuracy-safe but "
                f"none is faster than bf16 ({_speed_source(safe)}; the best {best:.2f}x). To see what FP8 does to "
                "your model's quality anyway, plan with --objective accuracy (next steps)")
    else:
        n = Counter(s["verdict"] for s in sites)
        text = (f"the plan will keep everything in bf16: no site is accuracy-safe yet ({n['unsafe']} unsafe, "
                f"{n['undecided']} undecided)")
    return f"**Bottom line: {text}.**"


# A reason shared by at least this many sites is spelled out once under the table.
SHARED_REASON_SITES = 3
_FIGURES = re.compile(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?|\b(fprop|dgrad|wgrad)\b")


def reason_groups(sites: list[dict]) -> tuple[dict[str, str], list[str]]:
    """({fqn: label}, lines): reasons that differ only in their figures (and the GEMM named), shared by
    several sites, get a label (R1, R2, ...) in the table and one line under it with an example; each
    row keeps its own figures in the error and speedup columns."""
    keys = {s["fqn"]: _FIGURES.sub("#", s["reason"]) for s in sites}
    counts = Counter(keys.values())
    names: dict[str, str] = {}
    labels: dict[str, str] = {}
    lines: list[str] = []
    for s in sites:
        key = keys[s["fqn"]]
        if counts[key] < SHARED_REASON_SITES:
            continue
        if key not in names:
            names[key] = f"R{len(names) + 1}"
            lines.append(f"**{names[key]}** ({_sites(counts[key])}; figures per site in the table), e.g. "
                         f"`{s['fqn']}`: {s['reason']}")
        labels[s["fqn"]] = names[key]
    return labels, ["Reasons shared by several sites:"] + lines if lines else []


def alignment_note(sites: list[dict]) -> list[str]:
    """One line for every ⚠ in the table: what the shape rule is and what fixes it."""
    n = sum(alignment_issue(s) is not None for s in sites)
    if not n:
        return []
    return [f"⚠ ({_sites(n)}): K or N not a multiple of {FP8_ALIGN}; cuBLAS FP8 GEMMs (scaled_mm) refuse the shape, "
            "the padding mod (loka.mods.padding) pads it exactly to the shape the row names."]


def _pad_to(site: dict) -> str:
    return f"⚠ pad to K={_round_up(site['in_features'])}, N={_round_up(site['out_features'])}"


def verdict_counts(sites: list[dict]) -> str:
    """One line: how many sites are safe (and how fast), unsafe, undecided, and unaligned."""
    count = {v: sum(s["verdict"] == v for s in sites) for v in ("safe", "unsafe", "undecided")}
    speed = {v: sum(s["verdict"] == "safe" and s["speed"] == v for s in sites) for v in ("fast", "slow", "unknown")}
    unaligned = sum(alignment_issue(s) is not None for s in sites)
    return (f"**{len(sites)} sites: {count['safe']} safe ({speed['fast']} fast, {speed['slow']} slow, "
            f"{speed['unknown']} speed unknown), {count['unsafe']} unsafe, {count['undecided']} undecided; "
            f"{unaligned} with a shape cuBLAS FP8 GEMMs refuse (⚠).**")


def target_line(meta: dict, recipes: list[str]) -> list[str]:
    """The GPU the report is for and the recipes (its formats side by side) measured for it."""
    if not meta.get("target"):
        return []
    return [f"Target: {meta['target']} ({meta.get('target_arch', '?')}); every recipe it runs is measured, "
            f"side by side: {', '.join(recipes)}"]


def next_steps(report: "ProbeReport", json_path: str | Path) -> list[str]:
    """What a model owner runs next, most useful first; it ends with the plan (and, when no site is
    fast, the accuracy-objective plan that still shows FP8's effect on quality)."""
    sites = report.sites
    steps = []
    undecided = [s["fqn"] for s in sites if s["verdict"] == "undecided"]
    if undecided:
        cap = report.doc["config"]["schedule"].get("max_samples")
        taken = len(report.doc["sampled_steps"])
        if cap and taken >= cap:
            more = f" (raise max_samples, now {cap}, e.g. to {2 * cap})"
        else:
            more = f" (train more steps: {taken} sampled steps were taken{f' of the {cap} allowed' if cap else ''})"
        steps.append(f"{len(undecided)} undecided site(s) need more sampled steps to decide{more}; "
                     "the plan keeps them in bf16 meanwhile.")
    # Padding pays only where FP8 can then win: an unaligned site that is safe and not slower than bf16
    # (a slow one stays bf16 padded or not, as the keep-in-hp policy's tiny GEMMs do).
    worth = [s["fqn"] for s in sites if alignment_issue(s) is not None and s["verdict"] == "safe" and s["speed"] != "slow"]
    if worth:
        steps.append(f"{len(worth)} accuracy-safe site(s) not slower than bf16 have K or N not a multiple of "
                     f"{FP8_ALIGN} (⚠): `loka.mods.padding.apply(model)` pads them (exact; `loka mods list` "
                     "describes every mod), then probe the padded model again.")
    timed = any(s["timings"] and s["timings"]["representative"] for s in sites)
    target = report.doc["meta"].get("target")
    if target:
        steps.append(f"`loka plan --report {json_path} --device {target} --out runs/plan` chooses a kernel or bf16 "
                     f"per GEMM among the recipes and kernels {target} runs"
                     + ("." if timed else f", ranked by its speed model where this report has no {target} timings."))
    elif timed:
        steps.append(f"`loka plan --report {json_path} --out runs/plan` chooses a kernel or bf16 per GEMM.")
    else:
        plan = f"`loka plan --report {json_path} --speed-model h100 --out runs/plan`"
        steps.append(f"{plan} chooses a kernel or bf16 per GEMM; this report has no GPU timings, so kernels are "
                     "ranked by the H100 speed model (on the GPU, `--speed-model measured` times them).")
    if not any(s["verdict"] == "safe" and s["speed"] == "fast" for s in sites):
        steps.append(f"`loka plan --report {json_path}{'' if timed else ' --speed-model h100'} --objective accuracy "
                     "--out runs/plan_accuracy` converts every accuracy-safe GEMM, fast or not: convert, train "
                     "or gate with that plan to see what FP8 does to your model's quality (not a plan for speed).")
    return [f"Next step{'s' if len(steps) > 1 else ''}:"] + [f"{i}. {t}" for i, t in enumerate(steps, 1)]


def _fmt(v: float) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def _md_row(s: dict, recipes: list[str], label: str | None = None) -> str:
    m = s["m_values"]
    m_str = "?" if not m else (str(m[0]) if len(m) == 1 else f"{m[0]}-{m[-1]}")
    issue = alignment_issue(s)
    shape = f"{m_str}×{s['in_features']}×{s['out_features']}" + (" ⚠" if issue else "")
    x = s["operands"].get("input", {})
    stats = f"{_fmt(x.get('amax'))} / {_fmt(x.get('crest_factor'))} / {_fmt(x.get('kurtosis'))}" if x else "–"
    cells = []
    for r in recipes:
        gemms = s["errors"].get(r, {})
        g = deciding_gemm(gemms)
        if g is None:
            cells.append("–")
            continue
        e = gemms[g]
        mark = {"safe": "✓", "unsafe": "✗", "undecided": "?"}[s["recipe_verdicts"][r]["verdict"]]
        cells.append(f"{mark} {_fmt(e['mean'])} [{_fmt(e['ci_lo'])}, {_fmt(e['ci_hi'])}] ({g})")
    sp = s["speedup"]
    speed = "–" if sp is None else f"{sp:.2f}x" + (" (model)" if s.get("speed_source") == "model" else "")
    verdict = s["verdict"] + (f", {s['speed']}" if s["speed"] != "unknown" else "")
    reason = ((label or s["reason"]) + (f"; {_pad_to(s)}" if issue else "")).replace("|", "/")
    return f"| `{s['fqn']}` | {shape} | {stats} | " + " | ".join(cells) + f" | {speed} | {verdict} | {reason} |"
