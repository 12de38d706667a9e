"""Skip a test whose kernel cannot run its recipe here, with the kernel's own reason.

CPU ``torch._scaled_mm`` runs tensorwise from torch 2.11 and rowwise only from 2.13; loka's kernels
say so per granularity (checked against the op itself in tests/dispatch/test_kernels_vs_emulated.py),
and a test of a rowwise ``scaled_mm`` path on CPU skips where the op cannot run.
"""

from __future__ import annotations

import pytest
import torch

from loka.kernels import KERNELS
from loka.recipe import as_recipe


def skip_unless_runs(kernel_name: str, recipe, device="cpu", shape=(16, 16, 16)) -> None:
    kernel = KERNELS.get(kernel_name)
    support = kernel.available(device)
    for g in ("fprop", "dgrad", "wgrad"):
        gemm = as_recipe(recipe).gemm(g)
        if support and not gemm.is_hp:
            support = kernel.supports(gemm, shape, torch.float32, device)
    if not support:
        pytest.skip(f"{kernel_name}: {support.reason}")
