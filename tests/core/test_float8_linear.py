"""Float8Linear against the emulated reference, forward and backward, for every recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loka import Float8Linear, convert, quantize
from loka.kernels import KERNELS
from loka.metrics import rel_error, sqnr
from loka.quantize import fake_quantize
from loka.recipe import RECIPE_NAMES, Recipe

from kernel_support import skip_unless_runs

RCP_E4M3 = torch.tensor(1 / 448, dtype=torch.float32)  # the scale rule: amax * fl32(1/fmax) (loka.quantize)

# Stochastically rounded recipes draw anew on every cast, so the reference cannot repeat them:
# tests/core/test_mx_nvfp4.py checks that their gradients average to the unrounded ones.
FP8_RECIPES = [n for n in RECIPE_NAMES if n != "bf16" and not n.endswith("_sr")]
SCALED_MM_RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp", "tensorwise_fnuz", "rowwise_fnuz"]  # CPU: both encodings


def reference_grads(lin: nn.Linear, recipe: Recipe, x: torch.Tensor, dy: torch.Tensor):
    """fp64 oracle: each GEMM's operands fake-quantized by the recipe, then multiplied in fp64."""
    w = lin.weight.detach().double()
    xd, dyd = x.double().reshape(-1, lin.in_features), dy.double().reshape(-1, lin.out_features)

    def gemm(name, a, b):
        g = recipe.gemm(name)
        return fake_quantize(a, g.a) @ fake_quantize(b, g.b).t()

    y = gemm("fprop", xd, w)
    dx = gemm("dgrad", dyd, w.t().contiguous())
    dw = gemm("wgrad", dyd.t().contiguous(), xd.t().contiguous())
    return y, dx, dw


@pytest.mark.parametrize("kernel", ["emulated", "scaled_mm"])
@pytest.mark.parametrize("name", FP8_RECIPES)
def test_forward_backward_match_fp64_reference(kernel, name):
    if kernel == "scaled_mm" and name not in SCALED_MM_RECIPES:
        pytest.skip(f"scaled_mm does not take {name}")
    skip_unless_runs(kernel, name)
    recipe = Recipe.from_name(name)
    lin = Float8Linear(96, 48, bias=True, recipe=recipe, kernels=kernel)
    x = (torch.randn(2, 16, 96) * torch.exp(torch.randn(96))).requires_grad_()
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = reference_grads(lin, lin.recipe, x.detach(), dy)
    bias = lin.bias.detach().double()
    # Same casts, different accumulation order (fp32 vs fp64): agreement to fp32 precision.
    assert rel_error(y_ref + bias, y.detach().reshape(-1, 48)) < 1e-5
    assert rel_error(dx_ref, x.grad.reshape(-1, 96)) < 1e-5
    assert rel_error(dw_ref, lin.weight.grad) < 1e-5
    assert torch.allclose(lin.bias.grad, dy.reshape(-1, 48).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SCALED_MM_RECIPES)
def test_scaled_mm_agrees_with_emulated(name):
    skip_unless_runs("scaled_mm", name)
    a_lin = Float8Linear(64, 32, recipe=name, kernels="emulated")
    b_lin = Float8Linear.from_linear(nn.Linear(64, 32), recipe=name, kernels="scaled_mm")
    b_lin.load_state_dict(a_lin.state_dict())
    x = torch.randn(48, 64)
    x[3] = 0  # a zero row
    x[7, :5] = 1e-30  # tiny values flush
    x[9, 0] = 3e4  # a large outlier
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a_lin(xa), b_lin(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert rel_error(ya, yb) < 1e-5
    assert rel_error(xa.grad, xb.grad) < 1e-5
    assert rel_error(a_lin.weight.grad, b_lin.weight.grad) < 1e-5


def test_fp8_error_is_fp8_sized_not_zero():
    """The conversion really quantizes: error vs hp is near e4m3's, far above bf16's."""
    lin = nn.Linear(256, 256)
    x = torch.randn(512, 256)
    ref = lin(x).detach()
    f8 = Float8Linear.from_linear(lin, recipe="tensorwise", kernels="emulated")
    s = sqnr(ref.double(), f8(x).detach().double())
    assert 20 < s < 40, s  # e4m3 x e4m3 GEMM on Gaussian data is ~29 dB


def test_state_dict_round_trips_with_nn_linear():
    lin = nn.Linear(32, 16)
    f8 = Float8Linear(32, 16, recipe="rowwise", kernels="emulated")
    assert set(f8.state_dict()) == set(lin.state_dict())
    f8.load_state_dict(lin.state_dict())
    assert torch.equal(f8.weight, lin.weight)
    lin2 = nn.Linear(32, 16)
    lin2.load_state_dict(f8.state_dict())
    assert torch.equal(lin2.bias, lin.bias)


def test_from_linear_reuses_parameters():
    lin = nn.Linear(32, 16)
    f8 = Float8Linear.from_linear(lin, recipe="tensorwise", kernels="emulated")
    assert f8.weight is lin.weight and f8.bias is lin.bias


def test_unaligned_shape_raises_or_falls_back():
    lin = Float8Linear(40, 32, recipe="tensorwise", kernels="scaled_mm")
    with pytest.raises(ValueError, match="K=40 is not a multiple of 16"):
        lin(torch.randn(16, 40))
    lin_fb = Float8Linear(40, 32, recipe="tensorwise", kernels="scaled_mm", fallback="hp")
    x = torch.randn(16, 40)
    y = lin_fb(x)
    assert "K=40" in lin_fb.fallbacks["fprop"]
    ref = x @ lin_fb.weight.t() + lin_fb.bias
    assert torch.allclose(y, ref, atol=1e-5)


def test_wgrad_batch_not_multiple_of_16_falls_back_with_reason():
    lin = Float8Linear(32, 32, recipe="tensorwise", kernels="scaled_mm", fallback="hp")
    x = torch.randn(5, 32, requires_grad=True)  # wgrad's K = 5
    lin(x).sum().backward()
    assert "K=5" in lin.fallbacks["wgrad"] and "fprop" not in lin.fallbacks


def test_per_gemm_kernels_mixed():
    lin = Float8Linear(64, 32, recipe="tensorwise", kernels={"fprop": "scaled_mm", "dgrad": "emulated", "wgrad": "bf16"})
    assert lin.recipe.wgrad.is_hp and not lin.recipe.fprop.is_hp
    x = torch.randn(16, 64, requires_grad=True)
    lin(x).sum().backward()
    # wgrad in hp is exact: dW = dyᵀ x with dy = ones
    assert torch.allclose(lin.weight.grad, x.detach().sum(0).expand(32, 64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown GEMM"):
        Float8Linear(64, 32, kernels={"forward": "emulated"})


def test_nd_input_bf16_and_autocast():
    lin = Float8Linear(64, 32, recipe="rowwise", kernels="emulated")
    x = torch.randn(2, 3, 5, 64)
    assert lin(x).shape == (2, 3, 5, 32)
    y = lin.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    lin32 = Float8Linear(64, 32, recipe="rowwise", kernels="emulated")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin32(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin32.weight.grad.dtype == torch.float32


def test_delayed_scaling_uses_history():
    lin = Float8Linear(32, 16, recipe="tensorwise-delayed", kernels="emulated")
    x_small = torch.randn(16, 32)
    lin(x_small)  # first step: dynamic; records amax
    hist = lin.scale_state.amax_history_fprop_input
    assert hist[0] == x_small.abs().max()
    x_big = x_small * 100  # the delayed scale comes from the small step: large values saturate
    y = lin(x_big).detach()
    x_sat = fake_quantize(x_big, lin.recipe.fprop.a, x_small.abs().max() * RCP_E4M3)
    assert x_sat.abs().max() <= x_small.abs().max() * 1.0001
    expect = fake_quantize(x_big, lin.recipe.fprop.a, x_small.abs().max() * RCP_E4M3) @ fake_quantize(lin.weight.detach(), lin.recipe.fprop.b).t()
    assert rel_error(expect + lin.bias.detach(), y) < 1e-5


def test_static_scaling_requires_calibration():
    lin = Float8Linear(32, 16, recipe="tensorwise-static", kernels="emulated")
    with pytest.raises(RuntimeError, match="no calibrated scale"):
        lin(torch.randn(4, 32))
    lin.set_static_scale("input", 0.01)
    w_scale = float(lin.weight.detach().abs().max()) / 448
    lin.set_static_scale("weight", w_scale)
    x = torch.randn(4, 32)
    y = lin(x).detach()
    x_q, _ = quantize(x, "e4m3", scale=torch.tensor(0.01))  # static: the given scale, saturating
    w_q, _ = quantize(lin.weight.detach(), "e4m3", scale=torch.tensor(w_scale))
    expect = (x_q.double() * 0.01) @ (w_q.double() * w_scale).t() + lin.bias.detach().double()
    assert rel_error(expect, y) < 1e-5
    with pytest.raises(ValueError, match="finite positive"):
        lin.set_static_scale("input", -1.0)


def test_eval_mode_caches_quantized_weight():
    lin = Float8Linear(64, 32, recipe="tensorwise", kernels="scaled_mm").eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        y1 = lin(x)
        y2 = lin(x)
        assert (lin.weight_cache.misses, lin.weight_cache.hits) == (1, 1) and torch.equal(y1, y2)
        lin.weight.mul_(2)  # an in-place update invalidates the cache
        y3 = lin(x)
    assert lin.weight_cache.misses == 2
    assert rel_error(2 * (y1 - lin.bias), y3 - lin.bias) < 0.1


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_gradients_match_eager_for_every_parameter(recipe):
    # torch 2.11's dynamo gave all-zero weight gradients here (even backend="eager") when the
    # Function's forward returned a tensor an op handed back unchanged (issue 24; loka.weight_cache.function_output).
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32))
    convert(model, recipe, kernels="emulated")
    x = torch.randn(32, 64, requires_grad=True)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gx, x.grad = x.grad.clone(), None
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, backend="eager")(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{n}: zero gradient under compile"
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-5, msg=n)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)


@pytest.mark.requires_sm89
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_fp8_gradients_on_gpu_match_eager(recipe):
    """scaled_mm under torch.compile (inductor) on the GPU: every gradient nonzero and within 1% of
    eager's (an FP8 value on a rounding boundary may round the other way after inductor's own norm)."""
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 128)).cuda()
    convert(model, recipe, kernels="scaled_mm")
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model)(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{n}: zero gradient under compile"
        assert rel_error(grads[n].double(), p.grad.double()) < 1e-2, n


def test_torch_compile_matches_eager():
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32))
    convert(model, "rowwise", kernels="emulated")
    x = torch.randn(32, 64, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    g_eager = model[0].weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    assert rel_error(eager, out) < 1e-5
    assert rel_error(g_eager, model[0].weight.grad) < 1e-4
