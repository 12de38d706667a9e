"""The probe report's FP8 headroom section (Markdown and HTML), rendered by a real browser."""

from __future__ import annotations

import pytest
import torch

from loka.dispatch.headroom import HeadroomOptions
from loka.dispatch.headroom_census import GemmSite, StepCensus
from loka.dispatch.headroom_estimate import estimate_headroom
from loka.kernels.costmodel import H200_SXM
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.headroom_section import band, headroom_markdown, with_headroom
from loka.probe.report import ProbeReport
from browser import check_page
from probe_toy import ToyMLP, loss_fn, make_batch


@pytest.fixture(scope="module")
def headroom():
    census = StepCensus(sites=(GemmSite("arch_a.big", 8192, 8192, 8192), GemmSite("arch_b.seq", 2**20, 256, 768),
                               GemmSite("arch_b.fm", 64, 128, 32, kind="bmm", batch=8192)),
                        label="toy ranker", attention_fwd_flops=1e12, dense_params=10**7,
                        elementwise_fwd_bytes=1e9, fused_fwd_bytes=2e8)
    return estimate_headroom(census, H200_SXM, HeadroomOptions(attention_efficiency=0.3,
                                                               producers={"arch_a.big": "norm_quant"}))


@pytest.fixture(scope="module")
def report(headroom):
    torch.manual_seed(0)
    model = ToyMLP()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("tensorwise",),
                                     stop_when_decided=False))
    for step in range(3):
        with probe.step(step):
            loss_fn(model, make_batch(step)).backward()
    return with_headroom(probe.report(model="toy"), headroom)


def test_band_is_a_point_only_when_both_ends_agree():
    assert band({"low": 1.2, "high": 1.2}) == "1.200x"
    assert band({"low": 1.1, "high": 1.25}) == "1.100x-1.250x"


def test_markdown_section_has_regimes_bands_arches_and_levers(report, headroom):
    md = report.to_markdown()
    assert "## FP8 headroom: toy ranker on H200 SXM (speed model)" in md
    r = headroom["regimes"]
    assert r["prequantized"]["bound"]["low"] < r["prequantized"]["bound"]["high"]  # the 1M-row GEMM: extrapolated
    assert "| every operand pre-quantized | " in md and band(r["prequantized"]["bound"]) in md
    assert "| producers loka has here | " in md and band(r["producers"]["bound"]) in md
    assert "| arch_a |" in md and "| arch_b |" in md and "attention at 30% of the bf16 peak" in md
    assert "What to change" in md and "| fusion |" in md
    assert ProbeReport.from_json(report.to_json()).to_markdown() == md  # the section survives the JSON round trip
    with pytest.raises(ValueError, match="estimate_headroom"):
        with_headroom(report, {"regimes": {}})


def test_report_without_headroom_has_no_section(report):
    doc = dict(report.doc)
    doc.pop("headroom")
    assert "FP8 headroom" not in ProbeReport(doc).to_markdown()
    assert headroom_markdown(None) == []


_CHECK = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e)), true);
window.addEventListener('load', () => {
  const h = [...document.querySelectorAll('h2, h3')].map(e => e.textContent);
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  const out = document.createElement('pre'); out.id = 'loka-check';
  out.textContent = JSON.stringify({h, tables, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def test_headroom_section_renders_in_a_real_browser(report, headroom, tmp_path):
    result, _ = check_page(report.to_html(), _CHECK, tmp_path)
    assert result["errors"] == []
    assert any(h.startswith("FP8 headroom: toy ranker") for h in result["h"])
    assert "Per arch (ms saved)" in result["h"] and "What to change, largest modelled gain first" in result["h"]
    # the sites table, then the headroom's regimes (4 + header), arches (2 + header), levers
    assert result["tables"][1:3] == [1 + len(headroom["regimes"]), 3]
    assert result["tables"][3] == 1 + min(len(headroom["levers"]), 12)
