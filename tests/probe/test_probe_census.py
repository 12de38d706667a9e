"""The GEMM census sees every GEMM with a parameter operand, by hand-counted FLOPs, on models loka didn't write."""

from __future__ import annotations

import pytest
import torch

from ctr_zoo import CIN, AutoInt, CrossNet, OddTower
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.census import NO_PARAM, gemm_census


def _shares(ref: dict[str, float]) -> dict[str, float]:
    total = sum(ref.values())
    return {k: v / total for k, v in ref.items()}


@pytest.mark.parametrize("case", ["cross", "autoint", "cin", "odd"])
def test_census_matches_hand_counted_flops(case):
    b = int(torch.randint(3, 40, ()).item())
    print("batch", b)
    if case == "cross":
        model, args, ref = CrossNet(), (torch.randn(b, 48),), CrossNet().forward_flops(b)
    elif case == "autoint":
        model, args, ref = AutoInt(), (torch.randn(b, 6, 32),), AutoInt().forward_flops(b, 6)
    elif case == "cin":
        model, args, ref = CIN(), (torch.randn(b, 8, 16),), CIN().forward_flops(b, 16)
    else:
        model, args, ref = OddTower(), (torch.randn(b, 429),), OddTower().forward_flops(b)
    census = gemm_census(model, *args)
    assert set(census.sites) == set(ref), census.table()
    for site, share in _shares(ref).items():
        assert census.share(site) == pytest.approx(share, rel=1e-12), site
    assert census.step_flops == pytest.approx(3 * sum(ref.values()), rel=1e-12)


def test_census_kinds_and_convertible_share():
    cross = gemm_census(CrossNet(), torch.randn(16, 48), probed={"deep", "head"}).summary()
    kinds = {r["site"]: r["kind"] for r in cross["sites"]}
    assert kinds["kernels.0"] == "matmul" and kinds["deep"] == "linear"
    assert cross["probed_share"] < 0.3 and cross["convertible_share"] == pytest.approx(1.0)
    cin = gemm_census(CIN(), torch.randn(16, 8, 16)).summary()
    assert {r["kind"] for r in cin["sites"]} == {"conv1x1", "linear"}
    auto = {r["site"]: r for r in gemm_census(AutoInt(), torch.randn(16, 6, 32)).summary()["sites"]}
    assert auto["attn.w_q"]["convertible"] and not auto[NO_PARAM]["convertible"]


def test_n1_head_is_not_worth_converting_by_share():
    rows = {r["site"]: r for r in gemm_census(OddTower(), torch.randn(64, 429)).summary()["sites"]}
    assert not rows["head"]["worth_converting"] and "N=1" in rows["head"]["reason"]
    assert rows["l1"]["worth_converting"] and rows["l1"]["shapes"][0] == [64, 429, 557]


def test_probe_report_states_coverage():
    model = CrossNet()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=2), candidates=("tensorwise",)))
    for step in range(2):
        with probe.step(step):
            model(torch.randn(32, 48)).sum().backward()
        model.zero_grad()
    report = probe.report()
    cov = report.doc["coverage"]
    # Linears by module hooks, x @ W by the matmul capture: every GEMM of the model is measured
    assert cov["probed_share"] == pytest.approx(1.0, rel=1e-12)
    assert {s["fqn"] for s in report.sites} == {"deep", "head", "kernels.0", "kernels.1", "kernels.2"}
    assert "loka can convert 100.0%" in report.to_markdown()
    assert type(report).from_json(report.to_json()).doc["coverage"]["probed_share"] == pytest.approx(cov["probed_share"])
