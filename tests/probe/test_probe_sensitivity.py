"""Sensitivity by injecting one site's emulated FP8 fprop, validated against real conversion.

"Real conversion" is tests/fp8_oracle.py's FP8 Linear: numpy + ml_dtypes quantization and
float64 GEMMs, no loka.quantize, so a wrong quantizer in the probe cannot agree with itself.
"""

import math

import pytest
import torch

from fp8_oracle import oracle_convert, oracle_loss_delta
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.sensitivity import site_sensitivity
from probe_toy import ToyMLP, loss_fn, make_batch


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_injected_loss_equals_loss_after_converting_the_site(recipe):
    torch.manual_seed(0)
    model = ToyMLP()
    batches = [make_batch(0), make_batch(1)]
    modules = {"inp": model.inp, "hidden": model.hidden, "out": model.out}
    sens = site_sensitivity(modules, [lambda b=b: loss_fn(model, b) for b in batches], recipe)
    for fqn, entry in sens.items():
        with torch.no_grad():
            real = sum(loss_fn(oracle_convert(model, fqn, recipe), b).item() for b in batches) / 2
            ref = sum(loss_fn(model, b).item() for b in batches) / 2
        # Same FP8 operands, float32 vs float64 accumulation: a few float32 ulps of a loss near 0.7.
        assert entry["loss_fp8"] == pytest.approx(real, rel=0, abs=3e-7), fqn
        assert entry["loss_ref"] == pytest.approx(ref, rel=0, abs=1e-7)
        assert entry["loss_delta"] == pytest.approx(real - ref, rel=0, abs=3e-7)
        assert abs(real - ref) > 3e-6, fqn  # the FP8 error does move the loss, 10x above the tolerance
        assert entry["n"] == 2 and entry["ci_lo"] <= entry["rel_loss_delta"] <= entry["ci_hi"]
        assert all(map(math.isfinite, (entry["ci_lo"], entry["ci_hi"])))  # two batches: a finite interval


def test_sensitivity_leaves_the_model_unchanged_and_lands_in_the_report():
    model = ToyMLP()
    batch = make_batch(1)
    before = loss_fn(model, batch).item()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), candidates=("rowwise",)))
    with probe.step(0):
        loss_fn(model, batch).backward()
    with pytest.raises(ValueError, match=r"at least 2 batches.*batches=\["):
        probe.measure_sensitivity(lambda: loss_fn(model, batch))  # one batch: no interval, so refused
    probe.measure_sensitivity(lambda b: loss_fn(model, b), batches=[batch, batch])
    assert not any(m._forward_hooks for m in model.modules())
    assert loss_fn(model, batch).item() == before
    s = probe.report().site("hidden")["sensitivity"]["rowwise"]
    assert s["loss_ref"] == pytest.approx(before) and s["n"] == 2
    # The same batch twice: no spread, so the interval is the point itself (finite, not n=1's infinite one).
    assert s["ci_lo"] == pytest.approx(s["rel_loss_delta"]) == pytest.approx(s["ci_hi"])


def test_systematic_loss_increase_makes_the_site_unsafe():
    """A regression fitted exactly: any FP8 error raises the loss on every batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    batches = [torch.randn(64, 32) for _ in range(4)]
    targets = [model(x).detach() + 1e-3 * torch.randn(64, 16) for x in batches]
    data = list(zip(batches, targets))
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("rowwise",)))
    for step in range(3):
        with probe.step(step):
            x, t = data[step]
            torch.nn.functional.mse_loss(model(x), t).backward()
    probe.measure_sensitivity(lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), batches=data)
    s = probe.report().site("0")
    sens = s["sensitivity"]["rowwise"]
    assert sens["n"] == 4 and sens["ci_lo"] > 1.0 and sens["abs_rel_loss_delta"] >= abs(sens["rel_loss_delta"])
    assert s["recipe_verdicts"]["rowwise"]["verdict"] == "unsafe"
    assert s["reason"].startswith("every candidate unsafe") and "sensitive" in s["reason"]


def test_unsafe_verdict_agrees_with_real_conversion():
    """The exactly-fitted regression again: the verdict and a real conversion agree that FP8 hurts."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    data = [(x, model(x).detach() + 1e-3 * torch.randn(64, 16)) for x in (torch.randn(64, 32) for _ in range(3))]
    loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=3), candidates=("tensorwise",)))
    for step in range(3):
        with probe.step(step):
            loss(model, data[step]).backward()
    probe.measure_sensitivity(lambda b: loss(model, b), batches=data)
    assert probe.report().site("0")["verdict"] == "unsafe"
    real = oracle_loss_delta(model, "0", "tensorwise", lambda m: loss(m, data[0]))
    assert real["rel_loss_delta"] > ProbeConfig().sensitivity_threshold
