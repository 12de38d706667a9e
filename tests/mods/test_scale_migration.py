"""Scale migration Norm -> Linear: exact in fp64, lowers FP8 error on outlier channels."""

import copy

import pytest
import torch

from loka.recipe import as_recipe
from loka.mods import scale_migration
from loka.mods.scale_migration import fprop_error, migration_scales

from .helpers import NormLinearBlock, ResidualNorm, outlier_block


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("pow2", [True, False])
def test_exact_in_fp64(norm, pow2):
    m = NormLinearBlock(norm=norm).double()
    unmodded = copy.deepcopy(m)
    with torch.no_grad():
        m.norm.weight.uniform_(0.1, 3.0)
        m.norm.weight[2] = 400.0
    unmodded.load_state_dict(m.state_dict())
    x = torch.randn(32, 24, dtype=torch.float64)
    res = scale_migration.apply(m, sample=x, alpha=0.5, pow2=pow2)
    x = torch.randn(48, 24, dtype=torch.float64)  # fresh inputs, not the calibration batch
    ref = unmodded(x)
    assert res.exact and res.sites == ["norm -> a, b"]
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


def test_pow2_scales_are_bit_exact_in_fp32():
    m = outlier_block(big=1e3).float()
    x = torch.randn(64, 64)
    ref = m(x)
    w_before = m[1].weight.detach().clone()
    scale_migration.apply(m, sample=x, alpha=0.5, pow2=True)
    assert not torch.equal(m[1].weight, w_before)
    # products (W_ij s_j)(y_j / s_j) equal W_ij y_j exactly when s_j is a power of two
    assert torch.equal(m(x), ref)


def test_fp8_error_drops_with_outlier_channels():
    """After / before is random with the block (seeds 0-199, 2026-12-01: median 0.66, max 0.89; a
    single block under 0.85 failed 5 of 200 fresh seeds, one in CI), so four blocks are drawn:
    each must drop, their mean under 0.85 (mean of four over seeds 0-99: at most 0.74)."""
    ratios = []
    for _ in range(4):
        m = outlier_block(big=1e4)
        x = torch.randn(256, 64, dtype=torch.float64)
        ref = m(x)
        res = scale_migration.apply(m, sample=x, recipe="tensorwise")
        (site,) = res.data.values()
        ratios.append(site["error_after"] / site["error_before"])
        torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
        # the chosen scales really are what lowers the error (recompute independently)
        y = m[0](x).detach()
        assert fprop_error(y, m[1].weight.detach().double(), as_recipe("tensorwise")) == pytest.approx(
            site["error_after"], rel=1e-6)
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.85, ratios


def test_non_exclusive_norm_is_skipped():
    m = ResidualNorm().double()
    x = torch.randn(8, 16, dtype=torch.float64)
    before = copy.deepcopy(m.state_dict())
    res = scale_migration.apply(m, sample=x, alpha=0.5)
    assert not res.changes and "also used by" in res.skipped[0][1]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_report_without_outliers_skips_block():
    m = outlier_block(big=1e4)
    x = torch.randn(32, 64, dtype=torch.float64)
    res = scale_migration.apply(m, {"1": {"col_amax_spread": 1.5}}, sample=x)
    assert not res.changes and "spread" in res.skipped[0][1]


def test_report_channel_amax_is_used():
    m = outlier_block(big=1e4)
    w_before = m[1].weight.detach().clone()
    x = torch.randn(32, 64, dtype=torch.float64)
    amax = torch.ones(64, dtype=torch.float64)
    res = scale_migration.apply(m, {"1": {"col_amax": amax.tolist(), "col_amax_spread": 100.0}}, sample=x, alpha=1.0, pow2=False)
    assert res.sites == ["0 -> 1"]
    # alpha=1 with the report's amax of 1: s = 1 everywhere, so the weights did not move
    torch.testing.assert_close(m[1].weight.detach(), w_before, rtol=0, atol=0)


def test_migration_scales_edge_values():
    a = torch.tensor([0.0, 1.0, 1e30, 4.0])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    s = migration_scales(a, w, 0.5)
    assert s[0] == 1 and s[1] == 1 and torch.isfinite(s).all() and s[3] == 2.0
    with pytest.raises(ValueError, match="alpha"):
        migration_scales(a, w, 1.5)


def test_checkpoint_is_loaded_before_the_mod():
    x = torch.randn(16, 24, dtype=torch.float64)
    trained = NormLinearBlock().double()
    ckpt = copy.deepcopy(trained.state_dict())
    fresh = NormLinearBlock().double()
    fresh.load_state_dict(ckpt)  # load, then mod
    scale_migration.apply(fresh, sample=x, alpha=0.5)
    torch.testing.assert_close(fresh(x), trained(x), rtol=1e-12, atol=1e-12)


def test_live_probe_supplies_per_channel_amax():
    from loka.probe import Probe, ProbeConfig, SamplingSchedule

    m = outlier_block(big=1e4)
    ref = copy.deepcopy(m)
    probe = Probe(m, ProbeConfig(candidates=("tensorwise",), fit_values=16,
                                 schedule=SamplingSchedule(every=1, max_samples=2)))
    for step in range(2):
        with probe.step(step):
            m(torch.randn(64, 64, dtype=torch.float64)).sum().backward()
    m.zero_grad(set_to_none=True)
    from loka.mods.scale_migration import _report_channels

    stats = _report_channels(probe, "1")
    assert stats["col_amax"].shape == (64,) and stats["col_amax_spread"] > 100
    x = torch.randn(32, 64, dtype=torch.float64)
    res = scale_migration.apply(m, probe, sample=x, recipe="tensorwise")
    (site,) = res.data.values()
    # a 32-row sample: 0.60-0.94x the error before over 200 random draws, so only "lower" is stable
    assert site["error_after"] < site["error_before"]
    torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-10)
