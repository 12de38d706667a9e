"""x @ W and einsum sites on parameters: captured like Linears, measured and decided by the probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctr_zoo import AutoInt, CrossNet
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.capture import StepCapture
from loka.probe.capture_matmul import install_matmul, matmul_params


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 20))
        self.emb = nn.Embedding(10, 12)  # a 2-D table weight: not a GEMM site
        self.lin = nn.Linear(20, 4)  # a module site, hooked as such

    def forward(self, x):
        return self.lin(torch.relu(x @ self.w))


def test_matmul_params_skip_tables_and_module_sites():
    assert [fqn for fqn, _ in matmul_params(_Mixed()).values()] == ["w"]


def test_capture_reads_x_at_w_as_its_gemm():
    model = _Mixed()
    cap = StepCapture(step=0, capture_rows=1 << 62, seed=0)
    install_matmul(model, cap, {id(model.w): "w"})
    x = torch.randn(3, 5, 12, requires_grad=True)
    h = x @ model.w
    h.retain_grad()
    out = model(x)
    out.square().sum().backward()
    cap.remove_hooks()
    (rec,) = cap.records["w"]  # the forward above outside model() is not seen: the mode is on only inside
    x2d = x.detach().reshape(-1, 12)
    assert torch.equal(rec.x, x2d) and torch.equal(rec.w, model.w.detach().t())
    # dy is the gradient of x @ W inside the model's forward: dW = xᵀ dy reproduces W.grad
    assert torch.allclose(x2d.T.double() @ rec.dy.double(), model.w.grad.double(), rtol=1e-5, atol=1e-5)


def _run(model, make_x, steps=6):
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=steps), candidates=("rowwise",),
                                     stop_when_decided=False))
    for step in range(steps):
        with probe.step(step):
            model(make_x()).square().mean().backward()
        model.zero_grad()
    return probe.report()


def test_probe_measures_cross_network_and_autoint_parameter_gemms():
    cross = _run(CrossNet(), lambda: torch.randn(128, 48))
    site = cross.site("kernels.1")
    assert (site["module_type"], site["in_features"], site["out_features"]) == ("matmul", 48, 48)
    assert all(site["errors"]["rowwise"][g]["n"] == 6 for g in ("fprop", "dgrad", "wgrad"))
    auto = _run(AutoInt(), lambda: torch.randn(64, 6, 32))
    assert {"attn.w_q", "attn.w_k", "attn.w_v", "attn.w_res"} <= {s["fqn"] for s in auto.sites}
    cov = auto.doc["coverage"]  # probed: every GEMM but the attention scores (no parameter), counted as they ran
    no_param = sum(r["share"] for r in cov["sites"] if r["kind"] == "activation")
    assert 0.05 < no_param < 0.2 and cov["probed_share"] == pytest.approx(1 - no_param, rel=1e-12)
