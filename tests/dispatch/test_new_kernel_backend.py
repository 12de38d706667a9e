"""Adding a kernel backend = its file + one registration line + its test.

A toy backend (the emulated reference under a new name, declared as an ordinary FP8 kernel) is
registered with one line; nothing else in loka names it, yet it is timed by the probe's site
timing, priced by the speed model, listed for its device, planned, applied and chosen by
``kernels="auto"`` — all from its attributes. Unregistering it removes it everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loka
from loka.devices import get_target
from loka.dispatch import Budget, plan
from loka.kernels import KERNELS
from loka.kernels.backend_reference import EmulatedKernel
from loka.kernels.costmodel import H100_SXM
from loka.kernels.kernel import default_candidates, modelled_kernels
from loka.nn import Float8Linear
from loka.probe.timing import time_site
from loka.recipe import GEMMS

from dispatch_report_fixtures import report, site

TOY = "toy_emulated"


class ToyKernel(EmulatedKernel):
    """The emulated GEMM, declared as a planned FP8 kernel of sm90 that the speed model prices."""

    name = TOY
    backend = "toy"
    reference = False
    modelled = True
    auto_rank = -1  # preferred by kernels="auto" over scaled_mm
    archs = frozenset({"sm90"})


@pytest.fixture
def toy():
    kernel = KERNELS.register(ToyKernel())  # the one registration line
    yield kernel
    KERNELS.unregister(TOY)


def test_a_registered_kernel_is_probed_planned_and_applied(toy):
    shape = (32, 64, 48)  # (M, K, N) of site "0" below
    timed = time_site(shape, ["rowwise"], dtype=torch.float32, warmup=0, iters=1)
    assert {e.gemm for e in timed.entries if e.kernel == TOY} == set(GEMMS)  # probed: a default candidate
    modelled = time_site(shape, ["rowwise"], model=H100_SXM, kernels=modelled_kernels("sm90"))
    assert {e.kernel for e in modelled.entries} >= {TOY}  # priced by the speed model, for its device
    assert TOY in get_target("h100").caps.kernels and TOY not in get_target("b200").caps.kernels

    # Planned: the measured timings, with the toy kernel at a hypothetical half of bf16 (a stand-in for a GPU).
    d = timed.to_dict()
    for e in d["entries"]:
        e["median_ms"] = d["bf16_ms"][e["gemm"]] / (2 if e["kernel"] == TOY else 0.5)
    rep = report(site("0", 64, 48, m=32))
    p = plan(rep, Budget(max_model_ne_delta=1.0), timings={"0": d}, progress=False)
    assert p.sites[0].kernels() == {g: TOY for g in GEMMS}, p.summary()

    # Applied: the converted layer runs the toy kernel, and computes what the reference computes.
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    ref = Float8Linear(64, 48, bias=False, recipe="rowwise", kernels="emulated")
    ref.weight.data.copy_(model[0].weight.data)
    res = loka.convert(model, plan=p)
    assert res.converted == ["0"] and {g: model[0].kernels[g].name for g in GEMMS} == {g: TOY for g in GEMMS}
    x = torch.randn(32, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert Float8Linear(64, 48, recipe="rowwise").kernels["fprop"].name == TOY  # auto_rank -1 wins "auto"


def test_unregistering_removes_the_kernel_everywhere(toy):
    KERNELS.unregister(TOY)
    assert TOY not in KERNELS and TOY not in default_candidates() and TOY not in modelled_kernels()
    assert TOY not in get_target("h100").caps.kernels
    KERNELS.register(ToyKernel())  # the fixture unregisters it again
    with pytest.raises(ValueError, match="already registered"):
        KERNELS.register(ToyKernel())
