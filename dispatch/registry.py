"""Registers loka's built-in kernels in ``KERNELS`` (imported for its effect).

Optional backends (torchao, Transformer Engine, Triton) register here too;
whether they can run on this machine is asked lazily through ``available()``.
"""

from __future__ import annotations

from loka.dispatch.backend_reference import Bf16Kernel, EmulatedKernel
from loka.dispatch.backend_scaled_mm import ScaledMMFastAccumKernel, ScaledMMKernel
from loka.dispatch.backend_torchao import (
    TorchaoBlockwiseKernel,
    TorchaoFastAccumKernel,
    TorchaoKernel,
    TorchaoMXKernel,
)
from loka.dispatch.backend_te import TEKernel
from loka.dispatch.kernel import KERNELS
from loka.padded import PaddedKernel
from loka.dispatch.triton_backend import TritonFusedQuantFastAccumKernel, TritonFusedQuantKernel

for _kernel in (
    Bf16Kernel(),
    EmulatedKernel(),
    ScaledMMKernel(),
    ScaledMMFastAccumKernel(),
    TorchaoKernel(),
    TorchaoFastAccumKernel(),
    TorchaoBlockwiseKernel(),
    TorchaoMXKernel(),
    TEKernel(),
    TritonFusedQuantKernel(),
    TritonFusedQuantFastAccumKernel(),
):
    KERNELS.register(_kernel)

# K and N zero-padded to multiples of 16 inside the call (loka.padded): odd widths such as 429
for _name in ("scaled_mm", "scaled_mm_fast_accum"):
    KERNELS.register(PaddedKernel(KERNELS.get(_name)))
