"""Models loka didn't write, end to end on CPU: coverage, conversion, and wgrad verdicts that decide."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctr_zoo import CIN, CrossNet, OddTower
import loka
from loka.probe import Probe, ProbeConfig, SamplingSchedule


def _batches(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(shape[1:], generator=gen).flatten()
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen)
        y = (torch.rand(shape[0], generator=gen) < torch.sigmoid(x.flatten(1) @ w_true / 10)).float()
        yield x, y


@pytest.mark.parametrize("make, shape", [(CrossNet, (256, 48)), (CIN, (256, 8, 16)), (OddTower, (256, 429))])
def test_probe_convert_train(make, shape):
    seed = int(torch.randint(0, 2**31, ()).item())
    print("seed", seed)
    torch.manual_seed(seed)
    model = make()
    fp8 = copy.deepcopy(model)
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=8), candidates=("rowwise",),
                                     stop_when_decided=False))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step, (x, y) in enumerate(_batches(shape, 8, seed)):
        with probe.step(step):
            nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        opt.step()
        opt.zero_grad()
    report = probe.report()
    # coverage: the census saw every GEMM, and says what the Linear-only hooks miss
    cov = report.doc["coverage"]
    assert cov["convertible_share"] == pytest.approx(1.0)
    assert {r["site"] for r in cov["sites"]} >= {s["fqn"] for s in report.sites}
    # stable verdicts: no wgrad of a site worth converting stays undecided (an N=1 head is not one)
    worth = {r["site"] for r in cov["sites"] if r["worth_converting"]}
    for s in (s for s in report.sites if s["fqn"] in worth):
        wgrad = s["errors"]["rowwise"]["wgrad"]
        assert wgrad["measure"] == "scale" and wgrad["verdict"] != "undecided", (s["fqn"], wgrad)
    # conversion of everything worth converting, then training in FP8
    res = loka.convert(fp8, "tensorwise", kernels="emulated", fallback="hp",
                       module_filter_fn=lambda module, fqn: fqn in worth, example=(next(_batches(shape, 1, seed))[0],))
    assert set(res.converted) == worth and res.verified, res.table()
    opt = torch.optim.Adam(fp8.parameters(), 1e-2)
    losses = []
    for x, y in _batches(shape, 30, seed + 1):
        loss = nn.functional.binary_cross_entropy_with_logits(fp8(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])
