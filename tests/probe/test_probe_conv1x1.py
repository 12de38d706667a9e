"""1x1 Conv1d sites: the probe captures them as GEMMs (channels first), measures and decides them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctr_zoo import CIN
import loka
from loka.metrics import rel_error
from loka.probe import Probe, ProbeConfig, SamplingSchedule, find_sites
from loka.probe.capture import install
from loka.probe.sensitivity import emulated_fprop
from loka.recipe import as_recipe


def test_capture_reads_a_1x1_conv_as_its_gemm():
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    conv = nn.Conv1d(12, 20, 1)
    cap = install({"c": conv}, step=0)
    x = torch.randn(3, 12, 7, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    cap.remove_hooks()
    rec = cap.records["c"][0]
    x2d, dy2d = x.detach().transpose(1, 2).reshape(-1, 12), g.transpose(1, 2).reshape(-1, 20)
    assert torch.equal(rec.x, x2d) and torch.equal(rec.dy, dy2d) and torch.equal(rec.w, conv.weight.detach().view(20, 12))
    # the GEMM view is the conv: x2d · Wᵀ + b, and dW = dyᵀ x
    assert torch.allclose(x2d @ rec.w.T + conv.bias, y.detach().transpose(1, 2).reshape(-1, 20), atol=1e-5)
    assert torch.allclose(dy2d.T @ x2d, conv.weight.grad.view(20, 12), atol=1e-4)


def test_only_plain_1x1_convs_are_sites():
    model = nn.Sequential(nn.Conv1d(8, 8, 1), nn.Conv1d(8, 8, 3), nn.Conv1d(8, 8, 1, stride=2), nn.Conv1d(8, 8, 1, groups=2))
    sites = find_sites(model)
    assert list(sites) == ["0"] and (sites["0"][0].in_features, sites["0"][0].out_features) == (8, 8)


def test_emulated_fprop_of_a_conv_matches_the_converted_module():
    conv = nn.Conv1d(24, 16, 1)
    x = torch.randn(4, 24, 9)
    recipe = as_recipe("rowwise")
    ref = emulated_fprop(conv, x, recipe.fprop)
    fp8 = nn.Sequential(conv)
    res = loka.convert(fp8, recipe, kernels="emulated")
    with torch.no_grad():
        out = fp8(x)
    assert res.converted == ["0"] and res.verified
    assert out.shape == (4, 16, 9) and rel_error(ref, out) < 1e-6


def test_probe_decides_cin_conv_sites():
    seed = int(torch.randint(0, 2**31, ()).item())
    print("seed", seed)
    torch.manual_seed(seed)
    model = CIN()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=6), candidates=("rowwise",),
                                     stop_when_decided=False))
    for step in range(6):
        with probe.step(step):
            model(torch.randn(128, 8, 16)).square().mean().backward()
        model.zero_grad()
    report = probe.report()
    conv = report.site("convs.1")
    assert (conv["in_features"], conv["out_features"]) == (24 * 8, 24)
    for gemm in ("fprop", "dgrad", "wgrad"):
        assert conv["errors"]["rowwise"][gemm]["n"] == 6
    assert conv["errors"]["rowwise"]["wgrad"]["verdict"] != "undecided"
    assert report.doc["coverage"]["probed_share"] == pytest.approx(1.0, abs=0.01)  # all but the N=1 head's sliver
