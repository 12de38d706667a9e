"""Acceptance at tiny size: a probe run on the bundled ranker writes all three report forms,
flags at least one site unsafe and one safe, each with a reason, and every verdict agrees
with converting that site for real (loka.convert, emulated kernel) and measuring after."""

import pytest
import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.cli import train_with_probe
from loka.probe.report import ProbeReport
from loka.probe.validate import conversion_errors, conversion_loss_delta
from loka.probe.workload import ranker_workload

SITES = ("dense.*", "over.*")


@pytest.mark.slow
def test_tiny_ranker_probe_verdicts_agree_with_real_conversion(tmp_path):
    torch.manual_seed(0)
    w = ranker_workload("tiny", batch_size=128)
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("tensorwise", "rowwise"),
                      include=SITES, fit_values=512)
    probe = Probe(w.model, cfg)
    train_with_probe(w, probe, 3, lr=1e-3, device="cpu", autocast=False, progress=False)
    batch = w.make_batch(1000)
    loss_fn = lambda m: w.loss_fn(m, batch)  # noqa: E731
    probe.measure_sensitivity(lambda: loss_fn(w.model))
    report = probe.report()
    paths = report.save(tmp_path)
    assert ProbeReport.load(paths["json"]).verdicts() == report.verdicts()
    assert paths["md"].read_text().count("| `") == len(report.sites) and "base64" in paths["html"].read_text()

    verdicts = report.verdicts()
    print({s["fqn"]: (s["verdict"], s["reason"]) for s in report.sites})
    assert "unsafe" in verdicts.values() and "safe" in verdicts.values(), verdicts
    for s in report.sites:
        assert s["reason"]
        for recipe, v in s["recipe_verdicts"].items():
            if v["verdict"] == "undecided":
                continue
            _check_against_conversion(w.model, s["fqn"], recipe, v, loss_fn, cfg)


def _check_against_conversion(model, fqn, recipe, verdict, loss_fn, cfg):
    errs = conversion_errors(model, fqn, recipe, lambda m: loss_fn(m))
    delta = conversion_loss_delta(model, fqn, recipe, lambda m: loss_fn(m))
    sensitive = abs(delta["rel_loss_delta"]) > cfg.sensitivity_threshold
    too_big = any(e > cfg.threshold(g) for g, e in errs.items())
    if verdict["verdict"] == "safe":
        assert not sensitive and not too_big, (fqn, recipe, errs, delta)
    elif verdict["reason"].startswith("sensitive"):
        assert sensitive, (fqn, recipe, delta)
    else:
        assert too_big, (fqn, recipe, errs)
