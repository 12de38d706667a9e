"""pytest-benchmark: every registered GEMM kernel, per recipe, at a few shapes (quantization included).

    .venv/bin/pytest bench/test_bench_kernels.py --benchmark-only -q

One benchmark per (kernel, recipe, shape): ``kernel.mm(a[M,K], b[N,K], recipe.fprop)``, the
per-call dynamic quantization of both operands included, as a model pays it. ``bf16`` is the
baseline. A kernel that is not available here, or does not take the recipe at the shape, is
*skipped with its reason* (shown by ``-rs``), never silently left out. For the same shapes as
ratios to bf16 and the pre-quantized FP8 ceiling, see bench/gemm_table.py.
"""

from __future__ import annotations

import pytest
import torch

from loka.kernels import KERNELS
from loka.recipe import HP_GEMM, as_recipe

RECIPES = ("tensorwise", "rowwise", "blockwise", "mx")
CPU_SHAPES = [(64, 128, 64), (256, 256, 256)]  # (M, K, N)
GPU_SHAPES = [(8192, 512, 512), (8192, 4096, 4096), (32768, 1024, 1024)]
KERNEL_NAMES = [k.name for k in KERNELS]


def _shape(on_gpu: bool, index: int):
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if index >= len(shapes):
        pytest.skip("fewer shapes on CPU; this one is a GPU size")
    return shapes[index]


@pytest.mark.parametrize("shape_index", [0, 1, 2], ids=["shape0", "shape1", "shape2"])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel(timed, benchmark, device, on_gpu, hp_dtype, name, recipe, shape_index):
    kernel = KERNELS.get(name)
    m, k, n = _shape(on_gpu, shape_index)
    if kernel.hp:
        if recipe != RECIPES[0]:
            pytest.skip(f"{name} runs hp GEMMs only; timed once, under {RECIPES[0]}")
        g = HP_GEMM
    else:
        g = as_recipe(recipe).fprop
        ok, why = kernel.available(device)
        if ok:
            ok, why = kernel.supports(g, (m, k, n), hp_dtype, device)
        if not ok:
            pytest.skip(f"{name}/{recipe} at {m}x{k}x{n}: {why}")
    a = torch.randn(m, k, device=device, dtype=hp_dtype)
    b = torch.randn(n, k, device=device, dtype=hp_dtype) * 0.05
    benchmark.extra_info.update(kernel=name, recipe=recipe if not kernel.hp else "hp", mkn=f"{m}x{k}x{n}",
                                flops=2 * m * k * n)
    out = timed(lambda: kernel.mm(a, b, g, out_dtype=hp_dtype))
    assert out.shape == (m, n) and torch.isfinite(out.float()).all()
