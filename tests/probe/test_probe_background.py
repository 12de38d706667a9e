"""Background analysis: the same results as analysing on the training thread, off that thread."""

import copy
import json
import threading

import numpy as np
import pytest
import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.site_state import SiteState
from probe_toy import ToyMLP, loss_fn, make_batch

FAST = dict(candidates=("tensorwise", "rowwise", "mx"), min_samples=2)


def _run(background: bool, steps: int = 7, nan_step: int | None = None, device: str = "cpu"):
    torch.manual_seed(0)
    model = ToyMLP().to(device)
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=2, max_samples=10),
                                     background=background, **FAST))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        x, y = (t.to(device) for t in make_batch(step))
        if step == nan_step:
            x = x.clone()
            x[1, 2] = float("nan")
        with probe.step(step):
            loss = loss_fn(model, (x, y))
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return probe, losses


def _without_timings(report) -> dict:
    data = json.loads(report.to_json())
    data.pop("created_utc")  # a wall-clock time
    data["config"].pop("background")  # the one setting the two runs differ in
    return data


@pytest.mark.parametrize("nan_step", [None, 4])
def test_background_report_equals_foreground_report(nan_step):
    fg, losses_fg = _run(False, nan_step=nan_step)
    bg, losses_bg = _run(True, nan_step=nan_step)
    np.testing.assert_array_equal(losses_fg, losses_bg)  # NaN after the injected NaN, in both
    assert bg.sampled_steps == fg.sampled_steps
    a, b = _without_timings(fg.report()), _without_timings(bg.report())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality
    assert any(s["errors"] for s in a["sites"])  # errors were measured, not two empty reports
    if nan_step is not None:
        assert any(s["verdict"] == "unsafe" and "non-finite" in s["reason"] for s in b["sites"])


@pytest.mark.requires_cuda
def test_background_report_equals_foreground_report_on_cuda():
    fg, losses_fg = _run(False, device="cuda")
    bg, losses_bg = _run(True, device="cuda")
    np.testing.assert_array_equal(losses_fg, losses_bg)
    a, b = _without_timings(fg.report()), _without_timings(bg.report())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_analysis_runs_on_the_worker_thread(monkeypatch):
    threads = []
    orig = SiteState.update

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(SiteState, "update", spy)
    probe, _ = _run(True, steps=3)
    probe.wait()
    assert threads and all(name.startswith("loka-probe") for name in threads)
    assert probe.overhead["background_s"] > 0
    threads.clear()
    _run(False, steps=3)
    assert threads and all(name == threading.current_thread().name for name in threads)


def test_analysis_error_surfaces_when_results_are_read(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("analysis failed")

    monkeypatch.setattr(SiteState, "update", broken)
    model = ToyMLP()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), **FAST))
    with probe.step(0):
        loss_fn(model, make_batch(0)).backward()  # the training step itself is unaffected
    with pytest.raises(RuntimeError, match="analysis failed"):
        probe.report()


def test_close_waits_and_stops_the_worker():
    probe, _ = _run(True, steps=5)
    probe.close()
    assert probe._worker is None and probe._pending is None
    assert probe.report().to_json()


def test_analysis_ignores_the_loops_autocast():
    """Ending a sampled step inside an autocast region must not run the error GEMMs in bf16."""
    torch.manual_seed(0)
    model = ToyMLP()
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), background=False, **FAST)
    plain, inside = Probe(model, cfg), Probe(copy.deepcopy(model), cfg)
    for probe in (plain, inside):
        scope = probe.step(0)
        loss_fn(probe.model, make_batch(0)).backward()
        if probe is inside:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                scope.__exit__(None, None, None)
        else:
            scope.__exit__(None, None, None)
    for fqn in plain.state:
        a, b = plain.state[fqn].errors, inside.state[fqn].errors
        assert {r: {g: t.rel_errors for g, t in v.items()} for r, v in a.items()} == \
               {r: {g: t.rel_errors for g, t in v.items()} for r, v in b.items()}
