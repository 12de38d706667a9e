"""pytest-benchmark: ``loka.quantize_operand`` per granularity (the per-call cast FP8 pays for).

    .venv/bin/pytest bench/test_bench_quantize.py --benchmark-only -q

Times the dynamic quantization of one activation operand (amax per group, scale, cast to
e4m3) with each recipe's input-operand settings (tensorwise, rowwise, blockwise 1x128,
mx 1x32 with power-of-two scales). CPU: a 256x512 tensor; GPU: ranker-sized activations.
"""

from __future__ import annotations

import pytest
import torch

from loka.formats import get_format
from loka.quantize import quantize_operand
from loka.recipe import as_recipe

GRANULARITIES = ("tensorwise", "rowwise", "blockwise", "mx")
CPU_SHAPES = [(256, 512)]
GPU_SHAPES = [(8192, 1024), (16384, 4096)]


@pytest.mark.parametrize("shape_index", [0, 1], ids=["shape0", "shape1"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize(timed, benchmark, device, on_gpu, hp_dtype, granularity, shape_index):
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if shape_index >= len(shapes):
        pytest.skip("one shape on CPU; the second is a GPU size")
    rows, cols = shapes[shape_index]
    op = as_recipe(granularity).fprop.a
    x = torch.randn(rows, cols, device=device, dtype=hp_dtype)
    benchmark.extra_info.update(shape=f"{rows}x{cols}", granularity=granularity, block=str(op.block))
    x_fp8, scale = timed(lambda: quantize_operand(x, op))
    assert x_fp8.dtype == get_format(op.format).dtype and x_fp8.shape == x.shape and torch.isfinite(scale).all()
