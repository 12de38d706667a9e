"""Every FP8 kernel that runs here, inside Float8Linear: forward, backward, eval (cached FP8 weight)."""

from __future__ import annotations

import pytest
import torch

from loka.kernels import KERNELS
from loka.metrics import sqnr
from loka.nn import Float8Linear
from loka.recipe import as_recipe

CPU_FP8 = [k.name for k in KERNELS if not k.hp and k.name != "emulated"]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp", "rowwise-delayed"])
@pytest.mark.parametrize("name", CPU_FP8)
def test_float8linear_with_kernel_matches_emulated(name, recipe):
    kernel = KERNELS.get(name)
    ok, why = kernel.available("cpu")
    if not ok:
        pytest.skip(why)
    r = as_recipe(recipe)
    if not all(kernel.supports(r.gemm(g), (32, 64, 64), torch.float32, "cpu") for g in ("fprop", "dgrad")):
        pytest.skip(f"{name} does not take {recipe}")
    ref = Float8Linear(64, 32, recipe=recipe, kernels="emulated")
    lin = Float8Linear(64, 32, recipe=recipe, kernels={"fprop": name, "dgrad": name,
                                                       "wgrad": name if not r.wgrad.is_hp else "bf16"})
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(48, 64)
    x_ref, x_k = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # twice: delayed scaling uses the history from the first call
        y_ref, y = ref(x_ref), lin(x_k)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    assert sqnr(y_ref, y) > 30
    assert sqnr(x_ref.grad, x_k.grad) > 30
    assert sqnr(ref.weight.grad, lin.weight.grad) > 30
    ref.eval()
    lin.eval()
    with torch.no_grad():
        assert sqnr(ref(x), lin(x)) > 30  # fprop with the FP8 weight quantized once and cached
