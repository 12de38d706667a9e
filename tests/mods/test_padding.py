"""Padding to multiples of 16: exact, padding stays zero under training, convert takes it."""

import copy

import torch
from torch import nn

import loka
from loka.mods import PaddedLinear, padding


def test_padded_equals_unpadded_in_fp64_with_grads():
    m = nn.Sequential(nn.Linear(13, 22), nn.SiLU(), nn.Linear(22, 1)).double()
    ref = copy.deepcopy(m)
    res = padding.apply(m)
    assert res.exact and res.sites == ["0", "2"] and isinstance(m[0], PaddedLinear)
    assert (m[0].linear.in_features, m[0].linear.out_features) == (16, 32)
    x = torch.randn(7, 13, dtype=torch.float64)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    y.sum().backward()
    y_ref.sum().backward()
    g = m[0].linear.weight.grad
    torch.testing.assert_close(g[:22, :13], ref[0].weight.grad)
    assert (g[22:] == 0).all() and (g[:, 13:] == 0).all() and (m[0].linear.bias.grad[22:] == 0).all()
    torch.testing.assert_close(m[0].to_linear().weight, ref[0].weight)


def test_fp8_result_unchanged_by_padding():
    lin = nn.Linear(13, 22)
    pad = PaddedLinear.from_linear(lin)
    x = torch.randn(9, 13)
    loka.convert(pad, "rowwise", kernels="emulated")
    ref = loka.Float8Linear.from_linear(lin, recipe="rowwise", kernels="emulated")
    torch.testing.assert_close(pad(x), ref(x), rtol=1e-5, atol=1e-5)


def test_convert_after_padding_converts_aligned_site():
    m = nn.Sequential(nn.Linear(13, 22))
    padding.apply(m)
    res = loka.convert(m, "tensorwise", kernels="emulated")
    assert res.converted == ["0.linear"]
    assert torch.isfinite(m(torch.randn(4, 13))).all()


def test_aligned_and_filtered_linears_untouched():
    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 3))
    res = padding.apply(m, module_filter_fn=lambda mod, fqn: fqn != "1")
    assert not res.changes and res.skipped == (("1", "excluded by module_filter_fn"),)
