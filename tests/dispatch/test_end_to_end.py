"""probe -> plan -> convert -> train on the bundled ranker (``tiny``), with every decision explained.

The CPU timings a probe takes here are real but not representative (FP8 on CPU is
emulated by torch and slower than bf16), so the plan from them keeps every GEMM in
bf16, each with its reason. To also exercise converting and training, the same
report is planned a second time with *hypothetical* timings (FP8 twice as fast as
bf16 everywhere): a stand-in for a GPU, not a measurement.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import loka
from loka.dispatch import Budget, plan
from loka.dispatch.microbench import open_cache
from loka.probe.timing import time_site
from loka.nn import Float8Linear
from loka.probe.cli import train_with_probe
from loka.probe.config import ProbeConfig, SamplingSchedule
from loka.probe.probe import Probe
from loka.models.workload import ranker_workload
from loka.recipe import GEMMS

KERNELS = ["scaled_mm"]  # one kernel keeps the micro-benchmarks short; every kernel is tested elsewhere
PROBED = ("interaction.layers.0.fmb.mlp.*", "over.trunk.*", "sequence.blocks.0.ffn_*", "over.heads.ctr")


def _probe_tiny():
    wl = ranker_workload("tiny", batch_size=64, seed=0)
    # A few sites keep the test fast; the others are not in the plan and stay nn.Linear.
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=2), candidates=("tensorwise", "rowwise"),
                      include=PROBED, min_samples=2, max_rows=64, fit_values=128)
    probe = Probe(wl.model, cfg)
    train_with_probe(wl, probe, 2, lr=1e-3, device="cpu", autocast=False, progress=False)
    probe.measure_sensitivity(lambda b: wl.loss_fn(wl.model, b), batches=[wl.make_batch(2), wl.make_batch(3)])
    return wl, probe.report(model="tiny")


def _cpu_timings(report, cache_dir) -> dict:
    """Micro-benchmarks of each probed site on this CPU, inputs drawn from the report's fits."""
    out = {}
    for s in report.sites:
        m = max(s["m_values"])
        fits = {role: fl[0] for role, fl in s["fits"].items() if fl}
        out[s["fqn"]] = time_site((m, s["in_features"], s["out_features"]), ["tensorwise", "rowwise"],
                                  kernels=KERNELS, dtype=torch.float32, fits=fits, warmup=0, iters=2,
                                  cache=open_cache(cache_dir, "cpu")).to_dict()
    return out


def _hypothetical_fast(timings: dict) -> dict:
    """The measured timings with every FP8 entry at half the bf16 time (a stand-in for a GPU)."""
    out = copy.deepcopy(timings)
    for t in out.values():
        for e in t["entries"]:
            e["median_ms"] = t["bf16_ms"][e["gemm"]] / 2
    return out


@pytest.mark.slow
def test_probe_plan_convert_train_tiny_ranker(tmp_path):
    wl, report = _probe_tiny()
    timings = _cpu_timings(report, tmp_path)
    budget = Budget(max_model_ne_delta=1.0)  # generous: tiny models are noisy
    cpu_plan = plan(report, budget, timings=timings, progress=False)
    assert {s.fqn for s in cpu_plan.sites} == {s["fqn"] for s in report.sites}
    for s in cpu_plan.sites:
        for g in GEMMS:
            assert s.gemms[g].reason, f"{s.fqn}/{g} has no explanation"
            if not s.gemms[g].is_fp8:
                assert s.gemms[g].reason.startswith("kept bf16: ")
    assert any("not representative" in n for n in cpu_plan.notes)

    # The saved report file plans the same as the in-memory report.
    path = report.save(tmp_path / "report")["json"]
    assert plan(path, budget, timings=timings, progress=False).to_dict()["sites"] == cpu_plan.to_dict()["sites"]

    gpu_like = plan(report, budget, timings=_hypothetical_fast(timings), progress=False)
    fp8_sites = [s for s in gpu_like.sites if s.is_fp8]
    assert fp8_sites, gpu_like.summary()
    assert gpu_like.totals()["speedup"] > 1.0
    summary = gpu_like.summary()
    assert all(f"| {s.fqn} |" in summary for s in gpu_like.sites)

    model = wl.model
    res = loka.convert(model, plan=gpu_like, on_mismatch="bf16")
    assert sorted(res.converted) == sorted(s.fqn for s in fp8_sites)
    assert "does not cover" in res.skipped["dense.mlp.out"]
    for s in gpu_like.sites:
        if not s.is_fp8:
            assert res.skipped[s.fqn].startswith("plan keeps bf16")
    for s in fp8_sites:
        mod = model.get_submodule(s.fqn)
        assert isinstance(mod, Float8Linear)
        assert {g: mod.kernels[g].name for g in GEMMS} == s.kernels()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(4, 9):
        batch = wl.make_batch(step)
        loss = wl.loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None) > 0
