"""Linear -> Norm blocks skip the activation row scale: same block output, same gradients."""

import copy

import pytest
import torch
from torch import nn

from loka import Float8Linear
from loka.metrics import rel_error
from loka.mods import RowScaleInvariantLinear, row_scale_free


@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, nn.RMSNorm])
def test_norm_is_insensitive_to_per_row_scale(norm_cls):
    norm = norm_cls(32, eps=1e-12).double()  # eps far below every row's mean square, so it cannot matter
    z = torch.randn(64, 32, dtype=torch.float64)
    c = torch.exp(torch.empty(64, 1, dtype=torch.float64).uniform_(-3, 7))  # arbitrary positive per-row factors
    torch.testing.assert_close(norm(z * c), norm(z), rtol=1e-6, atol=1e-6)


def _block(norm_cls, bias=False):
    return nn.Sequential(nn.Linear(48, 32, bias=bias), norm_cls(32)).double()


@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, nn.RMSNorm])
@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_same_block_output_and_grads_as_float8_linear(norm_cls, granularity):
    ref = _block(norm_cls)
    modded = copy.deepcopy(ref)
    x = torch.randn(40, 48, dtype=torch.float64)
    res = row_scale_free.apply(modded, sample=x, recipe=granularity, kernels="emulated")
    assert res.exact and isinstance(modded[0], RowScaleInvariantLinear)
    ref[0] = Float8Linear.from_linear(ref[0], recipe=granularity, kernels="emulated")  # the unfused FP8 path
    x1 = torch.randn(40, 48, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = ref(x1), modded(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    # dgrad/wgrad quantize dz' / s_a instead of dz: equal up to rounding, so a few elements may
    # land one FP8 step apart; compare as FP8 GEMMs are compared, by relative error.
    assert rel_error(x1.grad, x2.grad) < 1e-2
    assert rel_error(ref[0].weight.grad, modded[0].weight.grad) < 1e-2


def test_output_of_linear_is_row_scaled_not_dequantized():
    m = _block(nn.LayerNorm)
    m[1].eps = 1e-12  # rows of 1e-3 would otherwise be eps-dominated in the hp reference itself
    x = torch.randn(8, 48, dtype=torch.float64) * torch.logspace(-3, 3, 8, dtype=torch.float64)[:, None]
    z_hp = m[0](x)
    row_scale_free.apply(m, sample=x, kernels="emulated")
    z = m[0](x)
    ratio = (z.norm(dim=1) / z_hp.norm(dim=1))
    assert ratio.max() / ratio.min() > 100  # rows scaled by 1/s_a, which spans the input's range
    assert rel_error(m[1](z_hp), m[1](z)) < 0.06  # only the FP8 error of the GEMM remains


def test_bias_rules():
    x = torch.randn(8, 48, dtype=torch.float64)
    zero = _block(nn.LayerNorm, bias=True)
    nn.init.zeros_(zero[0].bias)
    assert row_scale_free.apply(zero, sample=x, kernels="emulated").changes
    const = _block(nn.LayerNorm, bias=True)
    nn.init.constant_(const[0].bias, 0.7)
    y = const(x)
    res = row_scale_free.apply(const, sample=x, kernels="emulated")
    assert res.exact and "constant bias" in res.changes[0].after
    const_rms = _block(nn.RMSNorm, bias=True)
    nn.init.constant_(const_rms[0].bias, 0.7)
    res = row_scale_free.apply(const_rms, sample=x, kernels="emulated")
    assert not res.changes and "bias='drop'" in res.skipped[0][1]
    res = row_scale_free.apply(const_rms, sample=x, kernels="emulated", bias="drop")
    assert res.changes and not res.exact
    moved = _block(nn.LayerNorm, bias=True)
    b, beta = moved[0].bias.detach().clone(), moved[1].bias.detach().clone()
    res = row_scale_free.apply(moved, sample=x, kernels="emulated", bias="move")
    assert res.changes and not res.exact and "MOVED" in res.changes[0].after
    torch.testing.assert_close(moved[1].bias.detach(), beta + b)
    no_norm_bias = _block(nn.RMSNorm, bias=True)
    res = row_scale_free.apply(no_norm_bias, sample=x, kernels="emulated", bias="move")
    assert not res.changes and "affine bias" in res.skipped[0][1]
    assert y.shape == const(x).shape


def test_needs_an_fp8_row_or_tensor_scale():
    with pytest.raises(ValueError, match="rowwise or tensorwise"):
        RowScaleInvariantLinear(32, 16, bias=False, recipe="blockwise", kernels="emulated")


def test_norm_with_other_consumers_is_skipped():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(16, 16, bias=False), nn.LayerNorm(16)

        def forward(self, x):
            z = self.lin(x)
            return self.norm(z) + z

    m = Two()
    res = row_scale_free.apply(m, sample=torch.randn(4, 16), kernels="emulated")
    assert not res.changes and type(m.lin) is nn.Linear


@pytest.mark.requires_sm89
def test_scaled_mm_path_on_gpu():
    ref = nn.Sequential(nn.Linear(256, 512, bias=False), nn.LayerNorm(512)).cuda().to(torch.bfloat16)
    modded = copy.deepcopy(ref)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    row_scale_free.apply(modded, sample=x, recipe="rowwise", kernels="scaled_mm")
    ref[0] = Float8Linear.from_linear(ref[0], recipe="rowwise", kernels="scaled_mm")
    with torch.no_grad():
        assert rel_error(ref(x), modded(x)) < 1e-2
