"""The headroom of the bundled `large` ranker reproduces the 2026-12-07 audit from the same inputs.

The audit priced every Linear of one step at batch 8192 with the H200 speed model, the checkpointed
blocks' forward run twice (the ranker checkpoints), attention at the bf16 peak and no bmm; the
figures below are the GEMM + attention bound of each variant (its high end: extrapolation trusted,
as the audit did), within 1%.
"""

from __future__ import annotations

import json

import pytest

from loka.app.cli import main
from loka.dispatch.headroom import HeadroomOptions
from loka.dispatch.headroom_estimate import estimate_headroom
from loka.kernels.costmodel import H200_SXM
from loka.models import RankerConfig
from loka.models.headroom_inputs import ranker_census

AUDIT = pytest.approx  # relative 1% below


@pytest.fixture(scope="module")
def large():
    census, producers = ranker_census(RankerConfig.from_size("large"), 8192)
    return census.without("bmm"), producers


def _bound(large, regime, **options):
    census, producers = large
    doc = estimate_headroom(census, H200_SXM, HeadroomOptions(producers=producers, **options))
    return doc["regimes"][regime]["bound"]["high"]


def test_census_has_every_linear_and_the_implemented_producers(large):
    census, producers = large
    assert len(census.linears()) == 60
    # loka's norm_quant producer: qkv and ffn_in of 3 sequence blocks, the FM block's MLP input of 8 layers
    assert len(producers) == 14 and set(producers.values()) == {"norm_quant"}
    assert all(s.recomputed == s.fqn.startswith(("sequence.blocks.", "interaction.layers.")) for s in census.sites)


def test_per_call_casts_top_out_at_1_16x(large):
    assert _bound(large, "per_call") == AUDIT(1.16, rel=0.01)


def test_implemented_producers_give_1_218x_not_1_315x(large):
    assert _bound(large, "producers") == AUDIT(1.218, rel=0.01)
    assert _bound(large, "all_producers", recompute=False) == AUDIT(1.315, rel=0.01)  # the old projection


def test_fp8_only_at_measured_winning_widths_1_205x(large):
    assert _bound(large, "all_producers", min_width=2048) == AUDIT(1.205, rel=0.01)


def test_attention_at_30_percent_of_peak_1_185x(large):
    assert _bound(large, "all_producers", min_width=2048, attention_efficiency=0.3) == AUDIT(1.185, rel=0.01)


def test_checkpoint_recompute_1_343x(large):
    assert _bound(large, "all_producers") == AUDIT(1.343, rel=0.01)


def test_cli_prints_three_regimes_with_bands_per_arch_and_levers(capsys, tmp_path):
    out = tmp_path / "h.json"
    assert main(["headroom", "--size", "large", "--batch", "8192", "--device", "h200", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("| per-call casts |", "| producers loka has here |", "| every operand pre-quantized |"):
        assert row in text
    assert "Per arch" in text and "| interaction |" in text and "| sequence |" in text
    assert "What to change" in text and "| producer |" in text and "| width |" in text and "| fusion |" in text
    doc = json.loads(out.read_text())
    prod = doc["regimes"]["producers"]
    assert prod["bound"]["high"] <= 1.22 and prod["bound"]["low"] < prod["bound"]["high"]  # a band: extrapolated
    assert f"{prod['bound']['low']:.3f}x-{prod['bound']['high']:.3f}x" in text


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["headroom", "--size", "huge"]) == 2
    assert main(["headroom", "--size", "tiny", "--attention-efficiency", "2"]) == 2
    assert main(["headroom", "--size", "tiny", "--step-ms", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "attention_efficiency" in err[1] and "step_source" in err[2]


def test_cli_options_reach_the_estimate(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["headroom", "--size", "tiny", "--batch", "256", "--no-producers", "--step-ms", "50",
                 "--step-source", "made up for the test", "--attention-efficiency", "0.5", "--min-width", "64",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["assumptions"] == {"attention_efficiency": 0.5, "min_width": 64, "recompute": True, "serving": False,
                                  "producers": {}}
    assert doc["step"]["bf16_ms"] == 50 and doc["step"]["source"] == "measured: made up for the test"
    assert "attention at 50% of the bf16 peak; 0 producer site(s) (none); FP8 only at K, N >= 64" in capsys.readouterr().out


def test_loka_probe_on_a_ranker_writes_the_headroom_section(tmp_path, capsys):
    assert main(["probe", "--size", "tiny", "--steps", "2", "--every", "1", "--batch-size", "64", "--no-timing",
                 "--no-sensitivity", "--headroom", "h100", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "probe_report.md").read_text()
    assert "## FP8 headroom: ranker tiny, batch 64 (fake tensors) on H100 SXM (speed model)" in md
    assert "<h2>FP8 headroom: ranker tiny" in (tmp_path / "probe_report.html").read_text()
    assert main(["probe", "--size", "tiny", "--steps", "2", "--every", "1", "--batch-size", "64", "--no-timing",
                 "--no-sensitivity", "--headroom", "none", "--out", str(tmp_path / "no")]) == 0
    assert "FP8 headroom" not in (tmp_path / "no" / "probe_report.md").read_text()


def test_proven_compiled_casts_count_in_the_producers_regime(large, tmp_path, capsys):
    """A compiled_cast proven on the model feeds fprop and dgrad: the producers regime gains exactly what
    pricing those GEMMs fed gives, and an unknown site or producer is one line, exit 2."""
    census, producers = large
    site = "interaction.layers.0.fmb.mlp.out"
    base = estimate_headroom(census, H200_SXM, HeadroomOptions(producers=producers))["regimes"]["producers"]
    more = estimate_headroom(census, H200_SXM, HeadroomOptions(producers={**producers, site: "compiled_cast"}))
    gain = more["regimes"]["producers"]["saved_ms"]["high"] - base["saved_ms"]["high"]
    from loka.dispatch.headroom import price_gemm
    s = next(x for x in census.sites if x.fqn == site)
    expected = sum(price_gemm(s, g, "all_producers", H200_SXM, HeadroomOptions()).saved_us
                   - price_gemm(s, g, "per_call", H200_SXM, HeadroomOptions()).saved_us for g in ("fprop", "dgrad")) / 1e3
    assert gain == pytest.approx(expected) and gain > 0
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"nope.site": "compiled_cast"}))
    assert main(["headroom", "--size", "tiny", "--batch", "64", "--producers", str(path)]) == 2
    assert "census does not have: ['nope.site']" in capsys.readouterr().err
