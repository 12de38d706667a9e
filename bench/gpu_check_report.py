"""What bench/gpu_check.py writes: each stage's figures read from its own outputs, one Markdown, one JSON.

Kept apart from the runner so a stage's outputs can be read (and tested) without running
it. Every collector takes the stage's work folder and returns ``(figures, markdown lines)``
from whatever the stage left there: a stage stopped at its time limit still shows what it
had written. Nothing here parses prose a stage printed, except the reason line of a failure.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StageResult:
    """One row of the summary; ``status`` is pending, running, ok, failed, timed out or skipped."""

    name: str
    what: str
    command: str
    limit_s: float
    status: str = "pending"
    reason: str = ""
    elapsed_s: float | None = None
    returncode: int | None = None
    figures: dict = field(default_factory=dict)
    markdown: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- collectors


def collect_env(work: Path) -> tuple[dict, list[str]]:
    path = work / "env.json"
    if not path.exists():
        return {}, ["(the stage wrote no env.json)"]
    env = json.loads(path.read_text())
    lines = ["- device: " + env.get("device", "?"), "- versions: " + ", ".join(
        f"{k} {v}" for k, v in env.get("versions", {}).items())]
    if env.get("doctor"):
        lines += ["", "`loka doctor`:", "", "```", env["doctor"].rstrip(), "```"]
    return env, lines


def collect_tests(junit: Path) -> tuple[dict, list[str]]:
    """Counts and failure names from pytest's JUnit XML (not from its printed summary)."""
    if not junit.exists():
        return {}, ["(pytest wrote no JUnit XML: it did not get as far as running tests)"]
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").strip().splitlines()
            failed.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}",
                           "kind": bad.tag, "message": message[0][:200] if message else ""})
    figures = dict(counts, failed=failed, summary=f"{counts['failures']} failed, {counts['errors']} errors of "
                   f"{counts['tests']} ({counts['passed']} passed, {counts['skipped']} skipped)")
    lines = [f"- {counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped (of {counts['tests']} selected)"]
    if failed:
        lines += ["", "| failed test | kind | first line |", "|---|---|---|"]
        lines += [f"| `{f['test']}` | {f['kind']} | {_cell(f['message'])} |" for f in failed]
    return figures, lines


def collect_ranker(work: Path) -> tuple[dict, list[str]]:
    """bench/ranker.py's JSON (figures) and its Markdown tables (headings demoted under this stage)."""
    docs = sorted(p for p in work.glob("*.json") if not p.name.startswith("plan-"))
    if not docs:
        return {}, ["(bench/ranker.py wrote no results: it stopped before its end, see the log)"]
    figures = json.loads(docs[-1].read_text())
    text = docs[-1].with_suffix(".md").read_text() if docs[-1].with_suffix(".md").exists() else ""
    lines = [("###" + line[1:] if line.startswith("## ") else line) for line in text.splitlines()
             if not line.startswith("# ")]
    variants = figures.get("variants", [])
    bad = [f"{v['name']}: {v['status']}" for v in variants if v.get("status") != "ok"]
    figures["summary"] = (f"{len(variants) - len(bad)} of {len(variants)} variants ran"
                          + (f"; {'; '.join(bad)}" if bad else ""))
    plans = sorted(work.glob("plan-*.json"))
    if plans:
        figures["plan"] = json.loads(plans[-1].read_text())
    return figures, lines


def collect_kernels(work: Path) -> tuple[dict, list[str]]:
    path = work / "kernels.json"
    if not path.exists():
        return {}, ["(the kernel table wrote nothing: it stopped before its first shape, see the log)"]
    doc = json.loads(path.read_text())
    lines = [f"- device: {doc['device']}; ranker `{doc['size']}` at batch {doc['batch']}, bf16 operands; "
             f"the {len(doc['sites'])} of {doc['sites_total']} site shapes with the most FLOPs (timed smallest first)"
             + ("" if doc.get("done") else "; **stopped before the last shape**"),
             "- time: ms per call, median (p10–p90); `graph×N`: N calls captured in one CUDA graph per timed "
             "replay; `events×N`: N back-to-back calls per CUDA event pair; `bf16 (per call)`: one call per "
             "event pair (launch overhead included)", "",
             "| gemm | M×K×N | kernel | ms | p10–p90 | TFLOP/s | vs bf16 | timing | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        shape = "×".join(str(v) for v in row["shape"])
        for e in row["entries"]:
            if "error" in e:
                lines.append(f"| {row['gemm']} | {shape} | {e['what']} | {_cell(e['error'])} | | | | | |")
                continue
            how = {"cuda_graph": "graph", "cuda_events": "events", "perf_counter": "cpu"}.get(e["method"], e["method"])
            lines.append(f"| {row['gemm']} | {shape} | {e['what']} | {e['median_ms']:.4f} | "
                         f"{e['p10_ms']:.4f}–{e['p90_ms']:.4f} | {e['tflops']:.1f} | {e['vs_bf16']:.2f}x | "
                         f"{how}×{e['calls']} | {_cell(e.get('note', ''))} |")
    timed = [e for row in doc["rows"] for e in row["entries"]]
    errors = [e for e in timed if "error" in e]
    fallbacks = [e for e in timed if e.get("note") and e.get("method") != "perf_counter"]
    doc["summary"] = (f"{len(doc['rows'])} GEMMs, {len(timed) - len(errors)} timings, {len(errors)} errors"
                      + (f", {len(fallbacks)} not capturable in a CUDA graph" if fallbacks else ""))
    skipped = sorted({f"{k} ({v})" for row in doc["rows"] for k, v in row.get("skipped", {}).items()})
    if skipped:
        lines += ["", "Not timed: " + "; ".join(skipped)]
    return doc, lines


def collect_probe_overhead(work: Path) -> tuple[dict, list[str]]:
    path = work / "probe_overhead.json"
    if not path.exists():
        return {}, ["(bench/probe_overhead.py wrote no result, see the log)"]
    r = json.loads(path.read_text())
    r["summary"] = f"overhead {100 * r['overhead_wall']:+.1f}% wall, {100 * r['overhead_direct']:.1f}% direct"
    return r, [f"- ranker `{r['size']}`, {r['steps']} probed + {r['steps']} plain steps, batch {r['batch_size']}, "
               f"sampling every {r['every']}, device {r.get('device', 'cpu')}",
               f"- wall: plain {r['plain_wall_s']:.2f} s, probed {r['probed_wall_s']:.2f} s, overhead "
               f"{100 * r['overhead_wall']:+.1f}%; direct (training thread's time in the probe) "
               f"{100 * r['overhead_direct']:.1f}%",
               f"- sampled steps {r['sampled_steps']}, sites decided {r['sites_decided']}/{r['sites']}"
               + (f", peak device memory {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "")]


def collect_nothing() -> tuple[dict, list[str]]:
    return {}, []


# ---------------------------------------------------------------- rendering


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).replace("|", "\\|")[:240]


def render(header: dict, results: list[StageResult]) -> str:
    lines = [f"# loka GPU check: {header.get('device', '?')}", ""]
    if not header.get("representative", False):
        lines += ["**CPU smoke run: every figure is NOT representative of GPU speed; this file only shows the "
                  "check runs end to end.**", ""]
    lines += [f"- command: `{header['command']}`", f"- date (UTC): {header['date_utc']}",
              f"- commit: {header['commit']}", "- versions: " + ", ".join(f"{k} {v}" for k, v in
                                                                        header["versions"].items()),
              f"- budget: {header['budget_s']:g} s for the whole run; each stage runs in its own process under "
              "its own limit (the smaller of its planned limit and what is left of the budget); a stage that "
              "fails or runs past its limit is a row with the reason and the next stage runs",
              f"- wall time so far: {header['elapsed_s']:.1f} s", "",
              "| # | stage | what | status | s / limit s | reason |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        took = "—" if r.elapsed_s is None else f"{r.elapsed_s:.1f}"
        lines.append(f"| {i} | {r.name} | {r.what} | {r.status} | {took} / {r.limit_s:g} | {_cell(r.reason)} |")
    for i, r in enumerate(results, 1):
        if r.status in ("pending", "running") and not r.markdown:
            continue
        lines += ["", f"## {i}. {r.name}: {r.status}", "", f"`{r.command}`", ""] + r.markdown
        if r.status not in ("ok", "pending", "running", "skipped") and r.log_tail:
            lines += ["", "Last lines of its output:", "", "```"] + r.log_tail[-15:] + ["```"]
    return "\n".join(lines) + "\n"


def write(out: Path, header: dict, results: list[StageResult]) -> None:
    """Rewrite gpu_check.md and gpu_check.json (atomically: a killed run leaves the last complete pair)."""
    for name, text in (("gpu_check.md", render(header, results)),
                       ("gpu_check.json", json.dumps({"header": header, "stages": [r.to_dict() for r in results]},
                                                     indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
