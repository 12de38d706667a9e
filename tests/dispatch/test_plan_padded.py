"""Odd widths are plan candidates: the probe times '+pad' kernels at 429/557 and the plan can choose them."""

from __future__ import annotations

import pytest
import torch

from ctr_zoo import OddTower
from loka import convert
from loka.dispatch import Budget, plan
from loka.kernels import KERNELS
from loka.probe.timing import time_site

pytestmark = pytest.mark.skipif(not KERNELS.get("scaled_mm").available("cpu"),
                                reason="torch._scaled_mm is not available on this CPU build")


def test_probe_times_padded_kernels_only_where_padding_is_needed():
    odd = time_site((32, 429, 557), ["rowwise"], kernels=["scaled_mm", "scaled_mm+pad"], dtype=torch.float32,
                    warmup=1, iters=2).to_dict()
    kernels = {(e["gemm"], e["kernel"]) for e in odd["entries"]}
    assert ("fprop", "scaled_mm+pad") in kernels and ("fprop", "scaled_mm") not in kernels
    aligned = time_site((32, 64, 48), ["rowwise"], kernels=["scaled_mm", "scaled_mm+pad"], dtype=torch.float32,
                        warmup=1, iters=2).to_dict()
    assert {e["kernel"] for e in aligned["entries"]} == {"scaled_mm"}
    assert "aligned shape" in aligned["skipped"]["fprop/scaled_mm+pad/rowwise"]


def _site(fqn, k, n):
    err = {"mean": 0.03, "ci_lo": 0.02, "ci_hi": 0.04, "sqnr_db": 30.0, "n": 5}
    timings = {"device_name": "test", "representative": False, "m": 32, "dtype": "float32",
               "bf16_ms": {g: 1.0 for g in ("fprop", "dgrad", "wgrad")},
               "entries": [{"gemm": g, "kernel": "scaled_mm+pad", "recipe": "rowwise", "median_ms": 0.5}
                           for g in ("fprop", "dgrad", "wgrad")]}
    return {"fqn": fqn, "in_features": k, "out_features": n, "m_values": [32],
            "errors": {"rowwise": {g: dict(err) for g in ("fprop", "dgrad", "wgrad")}}, "timings": timings}


def test_plan_chooses_padded_kernel_for_429_wide_layers_and_convert_applies_it():
    doc = {"kind": "loka.probe.report", "schema_version": 1, "sites": [_site("l1", 429, 557), _site("l2", 557, 429)]}
    p = plan(doc, Budget(), progress=False)
    for s in p.sites:
        assert {c.kernel for c in s.gemms.values()} == {"scaled_mm+pad"}, s.summary_reason()
    model = OddTower()
    params = list(model.parameters())
    res = convert(model, plan=p, on_mismatch="bf16")
    assert sorted(res.converted) == ["l1", "l2"] and not res.hp_gemms
    assert model.l1.kernels["wgrad"].name == "scaled_mm+pad"
    model(torch.randn(24, 429)).sum().backward()  # wgrad's K = 24 is padded too
    assert not model.l1.fallbacks and all(p is q for p, q in zip(params, model.parameters()))


def test_plan_with_conv1x1_sites_applies_to_cin():
    from ctr_zoo import CIN
    from loka.convert import gemm_counts

    model = CIN()
    sites = [_site(f"convs.{i}", c.in_channels, c.out_channels) for i, c in enumerate(model.convs)]
    sites.append(_site("head", model.head.in_features, 1))
    p = plan({"kind": "loka.probe.report", "schema_version": 1, "sites": sites}, Budget(), progress=False)
    params = list(model.parameters())
    res = convert(model, plan=p)
    assert sorted(res.converted) == ["convs.0", "convs.1", "head"] and not res.hp_gemms, res.table()
    assert model.loka_param_gemms.engines["convs.0"].kernels["fprop"].name == "scaled_mm+pad"
    model(torch.randn(16, 8, 16)).sum().backward()
    assert all(p is q for p, q in zip(params, model.parameters())) and model.convs[1].weight.grad is not None
    counts = gemm_counts(model)["convs.1"]
    assert counts["fp8_gemms_observed"] == counts["expected"] == {"fprop": 1, "dgrad": 1, "wgrad": 1}, counts


def test_plan_with_matmul_sites_applies_to_a_cross_network():
    from ctr_zoo import CrossNet

    model = CrossNet()
    sites = [_site(f"kernels.{i}", 48, 48) for i in range(3)] + [_site("deep", 48, 32), _site("head", 80, 1)]
    p = plan({"kind": "loka.probe.report", "schema_version": 1, "sites": sites}, Budget(), progress=False)
    ref = model(torch.randn(8, 48))  # warm: nothing converted yet
    params = list(model.parameters())
    res = convert(model, plan=p)
    assert sorted(res.converted) == ["deep", "head", "kernels.0", "kernels.1", "kernels.2"], res.table()
    assert set(model.state_dict()) == {n for n, _ in CrossNet().state_dict().items()}  # no new state
    x = torch.randn(16, 48)
    model(x).sum().backward()
    assert all(p is q for p, q in zip(params, model.parameters())) and model.kernels[0].grad is not None
    assert ref.shape == (8, 1)


def test_plan_keyed_by_gemm_index_applies_to_a_parameter_used_twice():
    """A probe names a parameter's second GEMM of a forward ``W#1``; the plan applies to the same model."""
    from ctr_forms import TiedProjection, CrossNetMix
    from loka.convert import gemm_counts

    for model, sites, x in ((TiedProjection(), [_site("W", 32, 48), _site("W#1", 48, 32)], torch.randn(32, 32)),
                            (CrossNetMix(), [_site("kernels", 32, 32), _site("kernels#1", 32, 32)], torch.randn(32, 32))):
        p = plan({"kind": "loka.probe.report", "schema_version": 1, "sites": sites}, Budget(), progress=False)
        res = convert(model, plan=p, example=(x,))
        site = sites[0]["fqn"]
        assert res.converted == [site] and res.verified, res.table()
        counts = gemm_counts(model)[site]
        assert counts["fp8_gemms_observed"] == counts["expected"] and counts["expected"]["fprop"] == 2, counts
