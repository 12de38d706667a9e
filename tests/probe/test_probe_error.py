"""GEMM error per recipe on captured operands, t-intervals and the sequential decision."""

import math

import pytest
import torch
from scipy import stats as sps

from loka.metrics import rel_error
from loka.quantize import fake_quantize
from loka.recipe import Recipe
from loka.probe.error import SAFE, UNDECIDED, UNSAFE, ErrorTrack, decide, gemm_error, gemm_operands, t_interval


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "blockwise", "mx"])
@pytest.mark.parametrize("gemm", ["fprop", "dgrad", "wgrad"])
def test_gemm_error_matches_direct_emulation(name, gemm):
    x, w, dy = torch.randn(48, 200), torch.randn(136, 200) * 0.05, torch.randn(48, 136) * 1e-3
    a, b = gemm_operands(x, w, dy, gemm)
    g = Recipe.from_name(name).gemm(gemm)
    err, sqnr = gemm_error(a, b, g, max_rows=10_000)
    ref = a.double() @ b.double().T
    out = fake_quantize(a, g.a).float() @ fake_quantize(b, g.b).float().T  # fp32 accumulation
    assert err == pytest.approx(rel_error(ref, out), rel=1e-6)
    assert sqnr == pytest.approx(-20 * math.log10(err))
    assert 0.005 < err < 0.15  # FP8 on Gaussian operands


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "blockwise", "mx"])
@pytest.mark.parametrize("role", ["input", "weight"])
def test_quantizing_kept_rows_equals_quantizing_everything(name, role):
    from loka.probe.error import _fake_quantize_rows

    t = torch.randn(300, 160) * torch.logspace(-3, 2, 300)[:, None]
    op = Recipe.from_name(name).fprop.a if role == "input" else Recipe.from_name(name).fprop.b
    rows = torch.randperm(300)[:50].sort().values
    kept, kept_q = _fake_quantize_rows(t, op, rows)
    assert torch.equal(kept, t[rows]) and torch.equal(kept_q, fake_quantize(t, op)[rows])


def test_gemm_operands_layouts():
    x, w, dy = torch.randn(5, 3), torch.randn(4, 3), torch.randn(5, 4)
    for gemm, expected in (("fprop", x @ w.T), ("dgrad", dy @ w), ("wgrad", dy.T @ x)):
        a, b = gemm_operands(x, w, dy, gemm)
        torch.testing.assert_close(a @ b.T, expected)
    assert gemm_operands(x, w, None, "dgrad") is None


def test_row_subsampling_estimates_the_full_error():
    a, b = torch.randn(2048, 64), torch.randn(2048, 64)
    g = Recipe.from_name("tensorwise").fprop
    full, _ = gemm_error(a, b, g, max_rows=4096)
    sub, _ = gemm_error(a, b, g, max_rows=256, gen=torch.Generator().manual_seed(3))
    assert sub == pytest.approx(full, rel=0.1)


def test_nonfinite_operand_gives_infinite_error():
    a = torch.randn(16, 32)
    a[2, 2] = float("inf")
    err, sqnr = gemm_error(a, torch.randn(8, 32), Recipe.from_name("rowwise").fprop)
    assert err == math.inf and sqnr == -math.inf


def test_t_interval_matches_scipy():
    values = (torch.rand(7) * 0.1).tolist()
    mean, lo, hi = t_interval(values, 0.9)
    ref = sps.t.interval(0.9, len(values) - 1, loc=sum(values) / 7, scale=sps.sem(values))
    assert (lo, hi) == pytest.approx(ref, rel=1e-9)
    assert t_interval([0.1], 0.95)[1:] == (-math.inf, math.inf)
    assert t_interval([0.1, math.inf], 0.95)[1] == math.inf


def test_decide():
    assert decide(0.01, 0.02, 3, 0.05, 3) == SAFE
    assert decide(0.06, 0.09, 3, 0.05, 3) == UNSAFE
    assert decide(0.04, 0.06, 3, 0.05, 3) == UNDECIDED
    assert decide(0.01, 0.02, 2, 0.05, 3) == UNDECIDED  # too few samples
    assert decide(math.inf, math.inf, 1, 0.05, 3) == UNSAFE  # non-finite: at once


def test_error_track_merge_weights_by_micro_batches():
    a, b = ErrorTrack(), ErrorTrack()
    a.add(0, [(0.1, 20.0)])
    b.add(0, [(0.2, 14.0), (0.4, 8.0)])
    b.add(1, [(0.3, 10.0)])
    m = ErrorTrack.merged([a, b])
    assert m.steps == [0, 1] and m.weights == [3, 1]
    assert m.rel_errors == pytest.approx([(0.1 + 0.2 + 0.4) / 3, 0.3])


def test_cancellation_site_is_unsafe_and_plain_site_safe():
    """Outputs much smaller than |x|·|W| (cancellation) make FP8's relative error large."""
    x = 5.0 + 0.01 * torch.randn(64, 64)  # large common offset
    w = torch.randn(32, 64)
    w = w - w.mean(dim=1, keepdim=True)  # rows sum to zero: the offset cancels in x·Wᵀ
    g = Recipe.from_name("rowwise").fprop
    assert gemm_error(x, w, g)[0] > 0.5
    assert gemm_error(torch.randn(64, 64), w, g)[0] < 0.08


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recipes_measured_together_equal_direct_emulation(dtype):
    """gemm_errors stacks the recipes of one operand; each result must equal quantizing alone.

    K=100 makes the 128x128 weight blocks span the reduction dim (the padded path), and a
    row subset (max_rows=32) exercises scales from kept rows vs the whole operand."""
    from loka.probe.error import _row_subset, gemm_errors

    a = (torch.randn(70, 100) * torch.logspace(-2, 1, 100)).to(dtype)
    b = (torch.randn(50, 100) * 0.1).to(dtype)
    names = ["tensorwise", "rowwise", "blockwise", "mx"]
    gemms = [Recipe.from_name(n).fprop for n in names]
    seed = int(torch.randint(0, 1 << 30, ()))
    got = gemm_errors(a, b, gemms, max_rows=32, gen=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    ra, rb = _row_subset(70, 32, gen), _row_subset(50, 32, gen)
    ref = a[ra].double() @ b[rb].double().T
    for name, g, (err, _) in zip(names, gemms, got):
        pad = 129 - 100 if name == "blockwise" else 0  # zero columns: same blocks' amax, same product
        ap, bp = (torch.nn.functional.pad(t, (0, pad)) for t in (a, b))
        out = fake_quantize(ap, g.a)[ra].float() @ fake_quantize(bp, g.b)[rb].float().T
        assert err == pytest.approx(rel_error(ref, out), rel=1e-5), name


def test_nonfinite_operand_makes_every_recipe_infinite_but_not_the_others_shape():
    from loka.probe.error import gemm_errors

    a, b = torch.randn(16, 48), torch.randn(8, 48)
    a[3, 7] = float("nan")
    errs = gemm_errors(a, b, [Recipe.from_name(n).fprop for n in ("tensorwise", "mx")])
    assert all(e == math.inf and s == -math.inf for e, s in errs)
