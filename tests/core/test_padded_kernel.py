"""Padding K and N inside the kernel call: odd widths run in FP8 and the Parameters stay the model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctr_zoo import OddTower
from loka import Float8Linear, convert
from loka.kernels import KERNELS
from loka.metrics import rel_error
from loka.kernels.padded import PaddedKernel, kernel_by_name
from loka.recipe import as_recipe


def _scaled_mm_here() -> bool:
    return bool(KERNELS.get("scaled_mm").available("cpu"))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise", "mx"])
@pytest.mark.parametrize("shape", [(37, 429, 557), (8, 13, 1), (16, 557, 429)])
def test_padded_equals_unpadded_reference(recipe, shape):
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(n, k)
    a[0, :] = 0.0  # a row of zeros
    g = as_recipe(recipe).fprop
    ref = KERNELS.get("emulated").mm(a, b, g, out_dtype=torch.float32)
    out = kernel_by_name("emulated+pad").mm(a, b, g, out_dtype=torch.float32)
    assert out.shape == (m, n)
    assert rel_error(ref, out) < 1e-6  # zeros change no amax and no product: same up to fp32 summation order


def test_padded_name_is_registered_once_and_refuses_hp():
    assert kernel_by_name("emulated+pad") is kernel_by_name("emulated+pad")
    assert kernel_by_name("emulated+pad").supports(as_recipe("rowwise").fprop, (8, 429, 1), torch.float32, "cpu")
    with pytest.raises(ValueError, match="hp"):
        PaddedKernel(KERNELS.get("bf16"))


@pytest.mark.skipif(not _scaled_mm_here(), reason="torch._scaled_mm is not available on this CPU build")
def test_scaled_mm_pad_takes_429_and_557():
    a, b = torch.randn(64, 429), torch.randn(557, 429)
    g = as_recipe("rowwise").fprop
    assert not KERNELS.get("scaled_mm").supports(g, (64, 429, 557), torch.float32, "cpu")
    out = kernel_by_name("scaled_mm+pad").mm(a, b, g, out_dtype=torch.float32)
    ref = KERNELS.get("emulated").mm(a, b, g, out_dtype=torch.float32)
    assert rel_error(ref, out) < 1e-3


def test_odd_tower_converts_every_gemm_and_an_earlier_optimizer_still_updates():
    kernels = "scaled_mm+pad" if _scaled_mm_here() else "emulated+pad"
    model = OddTower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # created before conversion
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = convert(model, "rowwise", kernels=kernels)
    assert sorted(res.converted) == ["head", "l1", "l2"] and not res.hp_gemms and not res.skipped, res.table()
    x = torch.randn(48, 429)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} was not updated by the optimizer made before conversion"
    assert not model.l1.fallbacks  # every GEMM ran padded, none fell back to hp


def test_eval_cached_weight_is_padded_too():
    lin = Float8Linear(429, 557, recipe="rowwise", kernels="emulated+pad")
    x = torch.randn(10, 429)
    with torch.no_grad():
        y_train = lin(x)
        lin.eval()
        y_eval = lin(x)  # fprop weight quantized once and cached (a Quantized operand)
    assert rel_error(y_train, y_eval) < 1e-6
