"""Acceptance at tiny size: a probe run on the bundled ranker writes all three report forms,
gives every site a verdict with a reason (at least one safe), and every decided verdict of
every (site, recipe) agrees with converting that site for real and measuring its GEMM errors
and loss change after conversion. "For real" is tests/fp8_oracle.py's FP8 Linear (numpy and
ml_dtypes quantization, float64 GEMMs; not loka.quantize, which the probe itself uses), and
loka.probe.validate's conversion (loka.convert, emulated kernel) is checked against it.

(The unsafe paths are checked against real conversion too, on models where FP8 is unsafe:
test_probe_sensitivity.py. At the default thresholds no site of the tiny ranker is
numerically unsafe in these few steps; see docs/probe.md.)"""

import pytest
import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.cli import train_with_probe
from loka.probe.error import t_interval
from loka.probe.report import ProbeReport
from loka.probe.validate import conversion_errors, conversion_loss_delta
from loka.models.workload import ranker_workload

from fp8_oracle import oracle_conversion_errors, oracle_loss_delta

SITES = ("dense.*", "over.*")


@pytest.mark.slow
def test_tiny_ranker_probe_verdicts_agree_with_real_conversion(tmp_path):
    torch.manual_seed(0)
    w = ranker_workload("tiny", batch_size=128)
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("tensorwise", "rowwise"),
                      include=SITES, fit_values=512)
    probe = Probe(w.model, cfg)
    train_with_probe(w, probe, 3, lr=1e-3, device="cpu", autocast=False, progress=False)
    batches = [w.make_batch(1000 + i) for i in range(3)]
    probe.measure_sensitivity(lambda b: w.loss_fn(w.model, b), batches=batches)
    loss_fns = [lambda m, b=b: w.loss_fn(m, b) for b in batches]
    report = probe.report()
    paths = report.save(tmp_path)
    assert ProbeReport.load(paths["json"]).verdicts() == report.verdicts()
    assert paths["md"].read_text().count("| `") == len(report.sites) and "base64" in paths["html"].read_text()

    verdicts = report.verdicts()
    assert "safe" in verdicts.values(), verdicts
    checked = 0
    for s in report.sites:
        assert s["reason"]
        for recipe, v in s["recipe_verdicts"].items():
            if v["verdict"] == "undecided":
                continue
            _check_against_conversion(w.model, s["fqn"], recipe, v, loss_fns, cfg)
            checked += 1
    assert checked >= 3

def _check_against_conversion(model, fqn, recipe, verdict, loss_fns, cfg):
    errs = oracle_conversion_errors(model, fqn, recipe, loss_fns[0])
    # loka's own validation path (loka.convert, emulated kernel) measures the same errors
    loka_errs = conversion_errors(model, fqn, recipe, loss_fns[0])
    assert loka_errs.keys() == errs.keys()
    for g, e in errs.items():
        assert loka_errs[g] == pytest.approx(e, rel=1e-3), (fqn, recipe, g, loka_errs, errs)
    too_big = any(e > cfg.threshold(g) for g, e in errs.items())
    # Loss change after real conversion, over the same batches, judged like the probe judges it.
    rel = [oracle_loss_delta(model, fqn, recipe, f)["rel_loss_delta"] for f in loss_fns]
    loka_rel = conversion_loss_delta(model, fqn, recipe, loss_fns[0])["rel_loss_delta"]
    assert loka_rel == pytest.approx(rel[0], rel=0, abs=1e-6), (fqn, recipe, loka_rel, rel[0])
    _, ci_lo, _ = t_interval(rel, cfg.confidence)
    sensitive = ci_lo > cfg.sensitivity_threshold
    if verdict["verdict"] == "safe":
        assert not too_big and not sensitive, (fqn, recipe, errs, rel)
    elif verdict["reason"].startswith("sensitive"):
        assert sensitive, (fqn, recipe, rel)
    else:
        assert too_big, (fqn, recipe, errs)
