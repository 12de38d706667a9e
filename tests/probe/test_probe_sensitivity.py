"""Sensitivity by injecting one site's emulated FP8 fprop, validated against real conversion."""

import copy

import pytest
import torch

from loka.convert import convert
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.sensitivity import site_sensitivity
from probe_toy import ToyMLP, loss_fn, make_batch


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_injected_loss_equals_loss_after_converting_the_site(recipe):
    torch.manual_seed(0)
    model = ToyMLP()
    batch = make_batch(0)
    modules = {"inp": model.inp, "hidden": model.hidden, "out": model.out}
    sens = site_sensitivity(modules, lambda: loss_fn(model, batch), recipe)
    for fqn, entry in sens.items():
        converted = copy.deepcopy(model)
        res = convert(converted, recipe, module_filter_fn=lambda m, name: name == fqn, kernels="emulated", fallback="hp")
        assert res.converted == [fqn]
        with torch.no_grad():
            real = loss_fn(converted, batch).item()
        assert entry["loss_fp8"] == pytest.approx(real, rel=1e-6, abs=1e-7), fqn
        assert entry["loss_delta"] == pytest.approx(real - entry["loss_ref"], abs=1e-6)
    assert any(abs(e["loss_delta"]) > 0 for e in sens.values())  # FP8 error does move the loss


def test_sensitivity_leaves_the_model_unchanged_and_lands_in_the_report():
    model = ToyMLP()
    batch = make_batch(1)
    before = loss_fn(model, batch).item()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=1), candidates=("rowwise",)))
    with probe.step(0):
        loss_fn(model, batch).backward()
    probe.measure_sensitivity(lambda: loss_fn(model, batch))
    assert not any(m._forward_hooks for m in model.modules())
    assert loss_fn(model, batch).item() == before
    s = probe.report().site("hidden")["sensitivity"]["rowwise"]
    assert s["loss_ref"] == pytest.approx(before) and "rel_loss_delta" in s
