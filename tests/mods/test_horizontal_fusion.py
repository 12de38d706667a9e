"""Horizontal fusion (shared input) and grouped GEMMs (same shape, different inputs): exact."""

import copy

import pytest
import torch
from torch import nn

import loka
from loka.metrics import rel_error
from loka.mods import GroupedLinear, find_groups, grouped_linear, horizontal_fusion, record
from loka.mods.grouped import grouped_mm_works

from .helpers import NormLinearBlock, TransposedShared


def test_shared_input_fusion_exact_and_one_gemm():
    m = NormLinearBlock().double()
    ref = copy.deepcopy(m)
    x = torch.randn(6, 24, dtype=torch.float64)
    res = horizontal_fusion.apply(m, sample=x)
    assert res.exact and res.data == {"gemms_before": 2, "gemms_after": 1}
    x1 = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y, y_ref = m(x1), ref(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    assert m.a._group.gemm_calls == 1
    y.sum().backward()
    y_ref.sum().backward()
    fused = m.a.fused
    assert fused.bias is None and m.a.bias is not None and "bias" not in dict(m.b.named_parameters())
    torch.testing.assert_close(m.a.bias.grad, ref.a.bias.grad)
    torch.testing.assert_close(fused.weight.grad[:40], ref.a.weight.grad)
    torch.testing.assert_close(fused.weight.grad[40:], ref.b.weight.grad)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_equal_but_distinct_inputs_share_the_gemm():
    m = TransposedShared().double()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 12, 5, dtype=torch.float64)
    horizontal_fusion.apply(m, sample=x)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-13, atol=1e-13)
    assert m.p._group.gemm_calls == 1


def test_member_called_on_other_input_recomputes_exactly():
    m = NormLinearBlock().double()
    horizontal_fusion.apply(m, sample=torch.randn(2, 24, dtype=torch.float64))
    u, v = torch.randn(4, 24, dtype=torch.float64), torch.randn(4, 24, dtype=torch.float64)
    wa = m.a.fused.weight[:40]
    torch.testing.assert_close(m.a(u), u @ wa.t() + m.a.bias)
    torch.testing.assert_close(m.b(v), v @ m.a.fused.weight[40:].t())


def test_convert_after_fusion_converts_the_fused_site():
    m = NormLinearBlock()
    horizontal_fusion.apply(m, sample=torch.randn(2, 24))
    res = loka.convert(m, "tensorwise", kernels="emulated")
    assert "a.fused" in res.converted
    assert torch.isfinite(m(torch.randn(3, 24))).all()


@pytest.mark.parametrize("backend", ["bmm", "grouped_mm"])
def test_grouped_linear_matches_loop(backend):
    dtype = torch.float64 if backend == "bmm" else torch.bfloat16
    if backend == "grouped_mm" and not grouped_mm_works("cpu", dtype)[0]:
        pytest.skip(grouped_mm_works("cpu", dtype)[1])
    lins = [nn.Linear(32, 16).to(dtype) for _ in range(3)]
    g = GroupedLinear.from_linears(lins, backend=backend)
    xs = [torch.randn(8, 32, dtype=dtype) for _ in range(3)]
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    for y, lin, x in zip(g(xs), lins, xs):
        torch.testing.assert_close(y, lin(x), rtol=tol, atol=tol)


def test_grouped_linear_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        GroupedLinear.from_linears([nn.Linear(4, 4), nn.Linear(4, 8)])
    with pytest.raises(ValueError, match="G, M, K"):
        grouped_linear(torch.randn(2, 3), torch.randn(2, 4, 3))


def test_find_groups_needs_different_inputs():
    class Towers(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, xs):
            return [t(x) for t, x in zip(self.t, xs)]

    flow = record(Towers(), ([torch.randn(2, 8) for _ in range(3)],))
    assert find_groups(flow) == [("t.0", "t.1", "t.2")]


def test_scaled_grouped_linear_matches_per_group_fp8():
    from loka import Float8Linear
    from loka.mods.grouped import scaled_grouped_linear

    x, w = torch.randn(3, 24, 32), torch.randn(3, 16, 32)
    out = scaled_grouped_linear(x, w, backend="emulated")
    for g in range(3):
        lin = Float8Linear(32, 16, bias=False, recipe="rowwise", kernels="emulated")
        with torch.no_grad():
            lin.weight.copy_(w[g])
        torch.testing.assert_close(out[g], lin(x[g]), rtol=1e-5, atol=1e-5)
    assert rel_error(torch.bmm(x, w.transpose(1, 2)), out) < 0.08


@pytest.mark.requires_sm89
def test_scaled_grouped_linear_on_gpu_matches_emulated():
    from loka.mods.grouped import scaled_grouped_linear

    x = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    out = scaled_grouped_linear(x, w)  # _scaled_grouped_mm where it runs, else emulated
    ref = scaled_grouped_linear(x, w, backend="emulated")
    assert rel_error(ref.float(), out.float()) < 1e-2


def test_equal_values_from_different_sources_keep_their_gradients():
    class TwoSources(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.q = nn.Parameter(torch.zeros(4, 8)), nn.Parameter(torch.zeros(4, 8))  # equal at init
            self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 5)

        def forward(self, _):
            return self.a(self.p * 1.0).sum() + 2 * self.b(self.q * 1.0).sum()

    m = TwoSources().double()
    ref = copy.deepcopy(m)
    flow_sample = torch.zeros(1)
    from loka.mods import fuse_linears

    fuse_linears(m, ("a", "b"))  # forced: they do not share an input in the dataflow sense
    m(flow_sample).backward()
    ref(flow_sample).backward()
    torch.testing.assert_close(m.p.grad, ref.p.grad)
    torch.testing.assert_close(m.q.grad, ref.q.grad)
    assert m.a._group.gemm_calls == 2  # equal values, different sources: not shared


def test_transposed_copies_share_under_autograd():
    m = TransposedShared().double()
    ref = copy.deepcopy(m)
    x1 = torch.randn(3, 12, 5, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    horizontal_fusion.apply(m, sample=x1.detach())
    m(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    assert m.p._group.gemm_calls == 1
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("op", ["mul", "exp", "view_of_mul"])
def test_source_identity_is_not_an_id_that_can_be_reused(op):
    # Two different sources must never look the same, also when autograd made the second node after
    # the first one's Python object was freed: an id() of a freed object is handed out again (issue 24).
    from loka.mods.horizontal_fusion import _same_autograd_source

    make = {"mul": lambda t: t * 1.0, "exp": torch.exp, "view_of_mul": lambda t: (t * 1.0).view(-1).view(4, 8)}[op]
    p, q = torch.zeros(4, 8, requires_grad=True), torch.zeros(4, 8, requires_grad=True)
    for _ in range(20):
        a, b = make(p), make(q)
        assert not _same_autograd_source(a, b)
        assert _same_autograd_source(a.t(), a.t()) and not _same_autograd_source(a.t(), b.t())
