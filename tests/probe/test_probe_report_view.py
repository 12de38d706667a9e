"""What a model owner reads in a probe report: counts, next steps, intervals in their domain,
one deciding GEMM in table and reason, unaligned shapes with their fix, and an HTML page that a
real browser renders with every image loaded and no error."""

import copy
import math
import random
import subprocess

import pytest
from scipy import stats as sps

from loka.probe.error import ErrorTrack, deciding_gemm
from loka.probe.report import ProbeReport
from loka.probe.site_state import combine_verdict
from browser import FLAGS, check_page, chromium
from probe_toy import toy_report


@pytest.fixture(scope="module")
def report():
    return toy_report()


def _with_sites(report, sites) -> ProbeReport:
    doc = copy.deepcopy(report.doc)
    doc["sites"] = sites
    return ProbeReport(doc)


def _odd_sites(report) -> list[dict]:
    """The toy's sites plus three made from them: K=141 (unaligned), unsafe, and one that never ran."""
    sites = copy.deepcopy(report.sites)
    odd = copy.deepcopy(sites[1])
    odd.update(fqn="odd_k", in_features=141)
    bad = copy.deepcopy(sites[1])
    bad.update(fqn="bad", verdict="unsafe", speed="unknown", best_recipe=None, speedup=None, reason="every candidate unsafe")
    never = copy.deepcopy(sites[1])
    never.update(fqn="never", operands={}, errors={}, verdict="undecided", speed="unknown", best_recipe=None,
                 speedup=None, reason="site never ran on a sampled step")
    return sites + [odd, bad, never]


def test_error_interval_never_goes_below_zero():
    """Relative errors are >= 0: the t-interval (scipy's) is cut at 0, its upper bound unchanged."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    values = [rng.uniform(0, 1e-3) for _ in range(3)] + [rng.uniform(0.3, 0.5)]  # wide spread: raw lower bound < 0
    track = ErrorTrack()
    for i, v in enumerate(values):
        track.add(i, [(v, 0.0)])
    s = track.summary(threshold=0.1, confidence=0.95, min_samples=3)
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=sps.sem(values))
    assert lo < 0, f"seed {seed}: the case must have a negative raw lower bound"
    assert s["ci_lo"] == 0.0 and s["ci_hi"] == pytest.approx(hi, rel=1e-9), f"seed {seed}"


def test_table_and_reason_name_the_same_gemm():
    """Random GEMM summaries: the verdict's reason, the deciding GEMM and a brute-force pick agree."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(200):
        gemms = {}
        for g in ("fprop", "dgrad", "wgrad"):
            t = rng.choice([0.08, 0.12])
            lo = rng.uniform(0, 0.2)
            hi = lo + rng.uniform(0, 0.1)
            verdict = "safe" if hi < t else ("unsafe" if lo > t else "undecided")
            gemms[g] = {"mean": (lo + hi) / 2, "ci_lo": lo, "ci_hi": hi, "n": 5, "threshold": t, "verdict": verdict}
        g = deciding_gemm(gemms)
        v = combine_verdict(gemms, 0)
        assert f"{g} " in v["reason"] or f"worst {g} " in v["reason"], (seed, gemms, v)
        # brute force: the worst bound, in the order unsafe > undecided > safe
        rank = {"unsafe": 2, "undecided": 1, "safe": 0}
        key = lambda k: (rank[gemms[k]["verdict"]],  # noqa: E731
                         (gemms[k]["ci_lo"] if gemms[k]["verdict"] == "unsafe" else gemms[k]["ci_hi"]) / gemms[k]["threshold"])
        assert g == max(gemms, key=key), seed
        assert v["verdict"] == max((s["verdict"] for s in gemms.values()), key=rank.get)


def test_markdown_counts_next_steps_and_flags_unaligned_shapes(report):
    rep = _with_sites(report, _odd_sites(report))
    md = rep.to_markdown("runs/p/probe_report.json")
    sites = rep.sites
    n = {v: sum(s["verdict"] == v for s in sites) for v in ("safe", "unsafe", "undecided")}
    assert f"{len(sites)} sites: {n['safe']} safe" in md and f"{n['unsafe']} unsafe, {n['undecided']} undecided" in md
    unaligned = [s for s in sites if s["in_features"] % 16 or s["out_features"] % 16]
    assert f"{len(unaligned)} with a shape cuBLAS FP8 GEMMs refuse" in md
    # no GPU timings in the report: the plan command ranks kernels by a speed model
    assert "`loka plan --report runs/p/probe_report.json --speed-model h100 --out runs/plan`" in md
    assert "undecided site(s) need more sampled steps" in md and "max_samples, now 4, e.g. to 8" in md
    row = next(line for line in md.splitlines() if line.startswith("| `odd_k`"))
    assert "×141×32 ⚠" in row and "pad to K=144, N=32" in row
    assert f"⚠ ({len(unaligned)} sites): K or N not a multiple of 16" in md and "loka.mods.padding" in md
    aligned = next(line for line in md.splitlines() if line.startswith("| `hidden`"))
    assert "⚠" not in aligned  # 32 x 32 is aligned


def test_markdown_next_step_is_only_the_plan_when_all_is_decided_and_aligned(report):
    sites = [s for s in copy.deepcopy(report.sites) if s["fqn"] == "hidden"]
    sites[0].update(verdict="safe", timings={"device_name": "a GPU", "representative": True, "m": 64,
                                             "bf16_ms": {"fprop": 1.0}, "entries": []})
    md = _with_sites(report, sites).to_markdown()
    assert "Next steps:\n1. `loka plan --report probe_report.json --out runs/plan`" in md  # timed: no speed model
    assert "0 with a shape" in md


def test_undecided_step_says_what_limits_the_samples(report):
    doc = copy.deepcopy(report.doc)
    doc["sites"][0]["verdict"] = "undecided"
    doc["config"]["schedule"]["max_samples"] = 10  # 4 steps were sampled: the run was too short, not the cap
    md = ProbeReport(doc).to_markdown()
    assert "train more steps: 4 sampled steps were taken of the 10 allowed" in md and "max_samples" not in md


def test_html_captions_say_what_is_left_out(report, monkeypatch):
    from loka.probe import html

    rep = _with_sites(report, _odd_sites(report))
    monkeypatch.setattr(html, "MAX_HIST_SITES", 2)
    page = rep.to_html()
    assert "never ran on a sampled step: never" in page
    drawn = [s["fqn"] for s in rep.sites if s["operands"]]
    assert f"beyond the first 2: {', '.join(drawn[2:])}" in page
    assert "No error measured (site never ran on a sampled step): never" in page


# Injected by the test only: records every image's load state and any error into the DOM.
_CHECK = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e)), true);
const _ce = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); _ce(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const out = document.createElement('pre'); out.id = 'loka-check';
  out.textContent = JSON.stringify({imgs, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def test_html_renders_in_a_real_browser(report, tmp_path):
    exe = chromium()
    rep = _with_sites(report, _odd_sites(report))
    paths = rep.save(tmp_path)
    page = paths["html"].read_text()
    result, run = check_page(page, _CHECK, tmp_path)
    flags = FLAGS
    assert len(result["imgs"]) == page.count("data:image/png;base64,") == 2  # error-vs-speed: one column, dropped
    assert all(i["ok"] and i["w"] > 200 for i in result["imgs"]), result
    assert result["errors"] == []
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    shot = tmp_path / "report.png"
    subprocess.run([exe, *flags[:4], "--window-size=1400,3000", f"--screenshot={shot}", paths["html"].as_uri()],
                   capture_output=True, timeout=3600)  # hang guard only
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
