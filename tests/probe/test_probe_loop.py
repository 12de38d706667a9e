"""The probe inside a training loop: numerics untouched, sampling schedule, autocast,
gradient accumulation, torch.compile, non-finite values."""

import copy
import math

import pytest
import torch
from torch import nn

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from probe_toy import ToyMLP, loss_fn, make_batch

FAST = dict(candidates=("tensorwise", "rowwise"), stats=True)


def _train(model, steps, probe=None, accum=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        scope = probe.step(step) if probe else None
        for k in range(accum):
            loss = loss_fn(model, make_batch(step * accum + k)) / accum
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        if scope is not None:
            scope.__exit__(None, None, None)
    return losses


def test_identical_losses_with_and_without_probe():
    torch.manual_seed(0)
    base = ToyMLP()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    probe = Probe(b, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=6), stop_when_decided=False, **FAST))
    la, lb = _train(a, 6), _train(b, 6, probe)
    assert la == lb  # bit-identical, not approximately equal
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert probe.sampled_steps == list(range(6))


def test_unsampled_steps_install_no_hooks():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(warmup=2, every=3, max_samples=2), **FAST))
    hooked = []
    for step in range(12):
        with probe.step(step) as scope:
            hooked.append(bool(m.hidden._forward_hooks))
            assert bool(scope) == hooked[-1]
            loss_fn(m, make_batch(step)).backward()
        assert not m.hidden._forward_hooks  # removed at step end
    assert [s for s, h in enumerate(hooked) if h] == [2, 5]
    assert probe.sampled_steps == [2, 5]


def test_plain_call_form_closes_previous_step():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), stop_when_decided=False, **FAST))
    for step in range(3):
        probe.step(step)
        loss_fn(m, make_batch(step)).backward()
    report = probe.report()  # closes the last step
    assert report.doc["sampled_steps"] == [0, 1, 2]


def test_gradient_accumulation_pairs_each_micro_batch_with_its_grad():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), **FAST))
    captured = {}
    orig_finish = probe.finish

    def spy():
        if probe._capture is not None:
            captured.update({k: list(v) for k, v in probe._capture.records.items()})
        orig_finish()

    probe.finish = spy
    with probe.step(0):
        xs = [make_batch(k)[0] for k in range(3)]
        for k, x in enumerate(xs):
            h = m.norm1(m.inp(x))
            out = m.out(nn.functional.silu(m.norm2(m.hidden(nn.functional.silu(h)))))
            (out.sum() * (k + 1)).backward()
    recs = captured["out"]
    assert len(recs) == 3 and probe.state["out"].micro_batches == 3
    for k, rec in enumerate(recs):
        assert torch.equal(rec.dy, torch.full_like(rec.dy, float(k + 1)))  # d(sum * (k+1))/d out
    assert torch.equal(captured["inp"][1].x, xs[1])
    assert probe.state["inp"].errors["tensorwise"]["wgrad"].weights == [3]


def test_autocast_operands_are_captured_in_bf16():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), **FAST))
    seen = {}
    orig = probe.state["hidden"].update

    def spy(step, records, recipes, cfg):
        seen["dtypes"] = (records[0].x.dtype, records[0].w.dtype, records[0].dy.dtype)
        orig(step, records, recipes, cfg)

    probe.state["hidden"].update = spy
    with probe.step(0), torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(m, make_batch(0)).backward()
    probe.wait()  # the analysis runs on the probe's worker thread
    assert seen["dtypes"] == (torch.bfloat16,) * 3


def test_eval_without_backward_measures_fprop_only():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=4), **FAST))
    for step in range(4):
        with probe.step(step), torch.no_grad():
            m(make_batch(step)[0])
    s = probe.report().site("hidden")
    assert s["errors"]["rowwise"]["fprop"]["n"] == 4 and s["errors"]["rowwise"]["wgrad"]["n"] == 0
    assert s["recipe_verdicts"]["rowwise"]["verdict"] == "undecided"
    assert "not measured" in s["recipe_verdicts"]["rowwise"]["reason"]


def test_decided_sites_stop_being_sampled():
    m = ToyMLP()
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=50), min_samples=3, **FAST)
    probe = Probe(m, cfg)
    _train(m, 10, probe)
    # Gaussian-like operands at these shapes are far below the thresholds: decided after min_samples.
    assert all(st.done for st in probe.state.values())
    assert len(probe.sampled_steps) < 10 and probe.done
    assert not probe.step(10)
    # A site stops being sampled once decided, even while others continue.
    assert min(len(st.steps) for st in probe.state.values()) == 3


def test_nonfinite_values_are_counted_and_make_the_site_unsafe():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), **FAST))
    x, y = make_batch(0)
    x[3, 5] = float("nan")
    x[7, 2] = float("inf")
    with probe.step(0):
        loss_fn(m, (x, y)).backward()  # must not raise
    s = probe.report().site("inp")
    assert s["operands"]["input"]["nonfinite"] == 2
    assert s["verdict"] == "unsafe" and "non-finite" in s["reason"]
    assert math.isinf(s["errors"]["tensorwise"]["fprop"]["mean"])


def test_compiled_model_probed_through_select():
    torch.manual_seed(0)
    m = ToyMLP()
    compiled = torch.compile(m, backend="eager")
    probe = Probe(compiled, ProbeConfig(schedule=SamplingSchedule(every=2, max_samples=2), **FAST))
    for step in range(4):
        with probe.step(step):
            model = probe.select(compiled)
            assert (model is m) == (step % 2 == 0)
            loss_fn(model, make_batch(step)).backward()
    assert probe.sampled_steps == [0, 2]
    assert probe.state["hidden"].errors["rowwise"]["dgrad"].rel_errors


def test_config_validation_messages():
    with pytest.raises(ValueError, match="every"):
        SamplingSchedule(every=0)
    with pytest.raises(ValueError, match="confidence"):
        ProbeConfig(confidence=1.5)
    with pytest.raises(ValueError, match="tuple of glob"):
        ProbeConfig(include="over.*")
    with pytest.raises(ValueError, match="unknown gemms"):
        ProbeConfig(thresholds={"fwd": 0.1})
    with pytest.raises(ValueError, match="not valid"):
        Probe(ToyMLP(), ProbeConfig(candidates=("nope",)))


def test_large_operands_are_row_sampled_with_exact_counts():
    m = ToyMLP()
    probe = Probe(m, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), capture_rows=32, **FAST))
    x, y = make_batch(0, batch_size=200)
    x[150, 3] = float("inf")  # most likely not among the kept rows: must still be counted
    x[10, 4] = 100.0
    with probe.step(0):
        loss_fn(m, (x, y)).backward()
    s = probe.report().site("inp")["operands"]["input"]
    assert s["count"] == x.numel() and s["nonfinite"] == 1
    assert s["amax"] == 100.0 and s["sampled_values"] <= 32 * 16
    assert probe.state["inp"].m_values == {200}


def test_overhead_budget_postpones_samples():
    import time

    m = ToyMLP()
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=50), stop_when_decided=False,
                      overhead_budget=0.05, **FAST)
    probe = Probe(m, cfg)
    for step in range(6):
        with probe.step(step):
            loss_fn(m, make_batch(step)).backward()
            time.sleep(0.01)  # a training step far cheaper than one probe analysis
    assert probe.sampled_steps == [0]  # the first sample is always taken; later ones do not fit
    assert probe.deferred_steps == [1]  # due from step 1 on, postponed
    o = probe.overhead
    assert o["probe_s"] > 0 and o["train_s"] > 0.05 and o["samples"] == 1
