"""Native MX, NVFP4 and fnuz kernels against the emulated reference, and what can be checked without them.

GPU-marked tests run where such a GPU is lent (requires_sm100: Blackwell; requires_gfx942: MI300;
requires_gfx950: MI350): each kernel quantizes with loka.quantize, so its output must equal the
emulated GEMM up to the accumulation and the bf16 output rounding (relative error <= 2**-7).
On the CPU: the scale layout cuBLAS reads (against torchao's ``to_blocked``), availability with
its reason, and which recipes each kernel takes.
"""

from __future__ import annotations

import pytest
import torch

from loka.kernels import KERNELS
from loka.kernels.backend_block_scaled import swizzle_scales
from loka.recipe import as_recipe

BF16_OUTPUT_TOLERANCE = 2.0**-7  # bf16 output (8 significant bits) plus fp32 accumulation order


def _operands(m: int, k: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(m, k, device=device) * torch.exp2(torch.randint(-6, 6, (m, 1), device=device).float())
    b = torch.randn(n, k, device=device)
    a[1] = 0.0  # a zero row
    a[2, :5] = torch.tensor([1e-30, -3e4, 3e4, 2.0**-20, 0.0], device=device)  # tiny, huge values in a block
    return a, b


def _check_against_emulated(kernel_name: str, recipe_name: str, gemm: str = "fprop", shape=(256, 512, 384)):
    kernel, ref = KERNELS.get(kernel_name), KERNELS.get("emulated")
    device = torch.device("cuda")
    ok, why = kernel.available(device)
    assert ok, why
    g = as_recipe(recipe_name).gemm(gemm)
    a, b = _operands(*shape, device=device)
    out = kernel.mm(a, b, g, out_dtype=torch.float32)
    expect = ref.mm(a, b, g, out_dtype=torch.float32)
    rel = float((out.double() - expect.double()).norm() / expect.double().norm())
    assert rel <= BF16_OUTPUT_TOLERANCE, f"{kernel_name}/{recipe_name}: relative difference {rel:.2e}"


@pytest.mark.requires_sm100
@pytest.mark.parametrize("recipe, gemm", [("mxfp8", "fprop"), ("mxfp8_floor", "fprop"), ("mx", "dgrad")])
def test_scaled_mm_mx_matches_emulated(recipe, gemm):
    _check_against_emulated("scaled_mm_mx", recipe, gemm)


@pytest.mark.requires_sm100
@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4_sr"])
def test_scaled_mm_nvfp4_matches_emulated(recipe):
    torch.manual_seed(0)  # nvfp4_sr's gradients draw: fprop (checked here) rounds to nearest
    _check_against_emulated("scaled_mm_nvfp4", recipe)


@pytest.mark.requires_sm100
@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp8_floor"])
def test_torchao_mx_matches_emulated(recipe):
    _check_against_emulated("torchao_mx", recipe)


@pytest.mark.requires_gfx942
@pytest.mark.parametrize("recipe", ["tensorwise_fnuz", "rowwise_fnuz"])
def test_scaled_mm_fnuz_on_mi300_matches_emulated(recipe):
    _check_against_emulated("scaled_mm", recipe)


@pytest.mark.requires_gfx950
def test_scaled_mm_mx_on_mi350_matches_emulated():
    _check_against_emulated("scaled_mm_mx", "mxfp8")


def test_swizzle_matches_torchao_to_blocked():
    try:
        from torchao.prototype.mx_formats.utils import to_blocked  # optional: torchao, the independent layout
    except Exception as exc:  # any import failure of the optional dependency is a reason to skip
        pytest.skip(f"torchao not importable ({type(exc).__name__}: {exc})")
    for rows, cols in ((128, 4), (200, 13), (7, 3), (384, 64)):
        s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
        assert torch.equal(swizzle_scales(s), to_blocked(s)), (rows, cols)


@pytest.mark.parametrize("name", ["scaled_mm_mx", "scaled_mm_nvfp4"])
def test_block_scaled_kernels_say_why_not_on_cpu(name):
    ok, why = KERNELS.get(name).available("cpu")
    assert not ok and ("needs a GPU of sm100" in why or "has no torch.nn.functional.scaled_mm" in why)
    assert KERNELS.get(name).untested


@pytest.mark.parametrize("kernel, takes, refuses", [
    ("scaled_mm_mx", ["mxfp8", "mxfp8_floor", "mx"], ["nvfp4", "tensorwise", "tensorwise_fnuz"]),
    ("scaled_mm_nvfp4", ["nvfp4", "nvfp4_sr"], ["mxfp8", "rowwise"]),
    ("torchao", ["tensorwise", "rowwise"], ["tensorwise_fnuz", "nvfp4", "mxfp8"]),
    ("scaled_mm", ["tensorwise", "rowwise_fnuz"], ["nvfp4", "mxfp8"]),  # CPU: either FP8 encoding
])
def test_which_recipes_each_kernel_takes(kernel, takes, refuses):
    k = KERNELS.get(kernel)
    for name in takes:
        assert k.supports(as_recipe(name).fprop, (256, 512, 256), torch.bfloat16, "cpu"), name
    for name in refuses:
        ok, why = k.supports(as_recipe(name).fprop, (256, 512, 256), torch.bfloat16, "cpu")
        assert not ok and why, name
    assert not KERNELS.get("scaled_mm_mx").supports(as_recipe("mxfp8").fprop, (256, 48, 256), torch.bfloat16, "cpu")


@pytest.mark.parametrize("recipe", ["tensorwise_fnuz", "rowwise_fnuz"])
def test_scaled_mm_fnuz_on_cpu_matches_emulated(recipe):
    """The CPU build of torch._scaled_mm multiplies fnuz FP8: the same path hipBLASLt takes on MI300."""
    kernel, ref = KERNELS.get("scaled_mm"), KERNELS.get("emulated")
    if not kernel.available("cpu"):
        pytest.skip(f"scaled_mm does not run on this CPU: {kernel.available('cpu').reason}")
    g = as_recipe(recipe).fprop
    a, b = _operands(64, 96, 48, device="cpu")
    out, expect = kernel.mm(a, b, g, out_dtype=torch.float32), ref.mm(a, b, g, out_dtype=torch.float32)
    rel = float((out.double() - expect.double()).norm() / expect.double().norm())
    assert rel <= 1e-5, rel  # both accumulate the same FP8 products in float32
