"""Registers loka's built-in kernels in ``KERNELS`` (imported for its effect).

Optional backends (torchao, Transformer Engine, Triton) register here too;
whether they can run on this machine is asked lazily through ``available()``.
Which device runs which of them natively is loka/devices.py's table (``DeviceCaps.kernels``).
"""

from __future__ import annotations

from loka.kernels.backend_block_scaled import ScaledMMMXKernel, ScaledMMNVFP4Kernel
from loka.kernels.backend_reference import Bf16Kernel, EmulatedKernel
from loka.kernels.backend_scaled_mm import ScaledMMFastAccumKernel, ScaledMMKernel
from loka.kernels.backend_torchao import (
    TorchaoBlockwiseKernel,
    TorchaoFastAccumKernel,
    TorchaoKernel,
    TorchaoMXKernel,
)
from loka.kernels.backend_te import TEKernel
from loka.kernels.kernel import KERNELS
from loka.kernels.padded import PaddedKernel
from loka.kernels.triton_backend import TritonFusedQuantFastAccumKernel, TritonFusedQuantKernel

# One line per kernel. The order is the order of preference among equally fast kernels (the planner
# keeps the first of a tie), and of each device's kernels (loka.devices.DeviceCaps.kernels).
KERNELS.register(Bf16Kernel())
KERNELS.register(EmulatedKernel())
KERNELS.register(ScaledMMKernel())
KERNELS.register(ScaledMMFastAccumKernel())
# K and N zero-padded to multiples of 16 inside the call (loka.kernels.padded): odd widths such as 429
KERNELS.register(PaddedKernel(KERNELS.get("scaled_mm")))
KERNELS.register(PaddedKernel(KERNELS.get("scaled_mm_fast_accum")))
KERNELS.register(TorchaoKernel())
KERNELS.register(TorchaoFastAccumKernel())
KERNELS.register(TEKernel())
KERNELS.register(TritonFusedQuantKernel())
KERNELS.register(TritonFusedQuantFastAccumKernel())
KERNELS.register(TorchaoBlockwiseKernel())
KERNELS.register(TorchaoMXKernel())
KERNELS.register(ScaledMMMXKernel())
KERNELS.register(ScaledMMNVFP4Kernel())
