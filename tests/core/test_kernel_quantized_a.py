"""Kernels that take a pre-quantized ``a`` (``takes_quantized_a``) compute what they compute on the
hp operand quantized the same way: the path the fused norm+quantize block feeds."""

from __future__ import annotations

import pytest
import torch

from loka.kernels import KERNELS
from loka.kernels.kernel import Quantized
from loka.quantize import quantize_operand
from loka.recipe import Recipe


@pytest.mark.parametrize("name", ["emulated", "scaled_mm"])
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_prequantized_a_equals_the_cast_inside(name, recipe):
    kernel = KERNELS.get(name)
    if not kernel.available("cpu"):
        pytest.skip(kernel.available("cpu").reason)
    assert kernel.takes_quantized_a
    g = Recipe.from_name(recipe).fprop
    a, b = torch.randn(48, 64) * torch.exp(torch.randn(64)), torch.randn(32, 64)
    a[5] = 0.0
    want = kernel.mm(a, b, g, out_dtype=torch.float32)
    got = kernel.mm(Quantized(*quantize_operand(a, g.a)), b, g, out_dtype=torch.float32)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="out_dtype"):
        kernel.mm(Quantized(*quantize_operand(a, g.a)), b, g)


def test_kernels_that_cast_a_themselves_say_so():
    assert not KERNELS.get("bf16").takes_quantized_a
    assert all(not k.takes_quantized_a for k in KERNELS if k.backend in ("torchao", "te", "triton"))
