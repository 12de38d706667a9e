"""GEMM FLOPs of the ranker counted from shapes, and the device peaks MFU is measured against.

bench/ranker.py reports achieved TFLOP/s and MFU per variant. Both rest on two numbers
that this file owns:

- **FLOPs per example**: one forward of the model with hooks on every ``nn.Linear`` site
  (``2·M·K·N`` for ``y[M,N] = x[M,K] · W[N,K]ᵀ``, M = all leading dims) and every
  ``BatchMatmul`` site (``2·batch·M·K·N``). Training counts ``6·M·K·N`` (fprop + dgrad +
  wgrad; for BatchMatmul the two backward products have the same cost). Every site's M
  grows linearly with the batch (M = B, B·D or B·T), so counting a few examples and
  scaling is exact. Attention inside ``F.scaled_dot_product_attention`` and the
  element-wise work are not counted: MFU here is *GEMM-site* MFU. Two counts: jagged
  histories (the work the examples need) and padded ones (``history_len`` slots per example,
  as architecture 1 ran on CUDA). bench/ranker.py now takes its MFU figures from
  `loka.models.estimate.count_step_flops` on the timed batches (`step_flops`) and only the
  site counts from here.
- **Peak**: dense (no sparsity) bf16 and FP8 tensor-core TFLOP/s from the vendors' data
  sheets, matched on the CUDA device name; unknown devices and CPUs get ``None`` ("n/a").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# (substring of the lower-cased device name, label, bf16 dense TFLOP/s, fp8 dense TFLOP/s).
# Order matters: the first match wins, so the more specific names come first.
PEAKS: tuple[tuple[str, str, float, float | None], ...] = (
    ("gh200", "GH200", 989.0, 1979.0),
    ("h200", "H200 SXM", 989.0, 1979.0),
    ("h100 nvl", "H100 NVL", 835.0, 1671.0),
    ("h100 pcie", "H100 PCIe", 756.0, 1513.0),
    ("h100", "H100 SXM", 989.0, 1979.0),
    ("h800", "H800 SXM", 989.0, 1979.0),
    ("b200", "B200", 2250.0, 4500.0),
    ("a100", "A100", 312.0, None),
    ("l40s", "L40S", 362.0, 733.0),
    ("l4", "L4", 121.0, 242.5),
)


@dataclass(frozen=True)
class Peak:
    """Dense tensor-core peaks of one device, in TFLOP/s (``fp8`` None: no FP8 tensor cores)."""

    label: str
    bf16: float
    fp8: float | None

    def describe(self) -> str:
        fp8 = f"{self.fp8:g}" if self.fp8 else "n/a"
        return f"{self.label}: bf16 dense {self.bf16:g} TFLOP/s, FP8 dense {fp8} TFLOP/s (data sheet)"


def peak_for(device_name: str) -> Peak | None:
    """The peak row matching ``device_name`` (e.g. "NVIDIA H100 80GB HBM3"), None if unknown."""
    name = device_name.lower()
    if name.startswith("cpu"):
        return None
    for key, label, bf16, fp8 in PEAKS:
        if key in name:
            return Peak(label, bf16, fp8)
    return None


@dataclass(frozen=True)
class GemmFlops:
    """Forward GEMM FLOPs per example, and how many sites of each kind were counted."""

    fwd_per_example: float
    linear_sites: int
    bmm_sites: int
    counted_on_step: bool = False  # from a whole training step (loka.models.estimate): 1/3 of it

    def train_step(self, batch_size: int) -> float:
        """fprop + dgrad + wgrad: 3 GEMMs of the forward's size, i.e. 6·M·K·N per Linear."""
        return 3.0 * self.fwd_per_example * batch_size

    def inference(self, batch_size: int) -> float:
        return self.fwd_per_example * batch_size

    def describe(self) -> str:
        if self.counted_on_step:
            return (f"{3 * self.fwd_per_example / 1e6:.3f} MFLOP per example per training step over "
                    f"{self.linear_sites} Linear + {self.bmm_sites} BatchMatmul sites and attention "
                    "(counted on the timed batches by loka.models.estimate; inference: a third)")
        return (f"{self.fwd_per_example / 1e6:.3f} MFLOP forward per example over {self.linear_sites} Linear + "
                f"{self.bmm_sites} BatchMatmul sites (train 6·M·K·N, inference 2·M·K·N; "
                "attention inside SDPA and element-wise work not counted)")


def count_gemm_flops(model: nn.Module, batch, n_examples: int, *, padded: bool = False) -> GemmFlops:
    """Forward GEMM FLOPs per example of ``model(batch)``; ``batch`` holds ``n_examples`` examples.

    ``padded=False`` counts the *useful* work: the ranker runs its histories jagged (padding
    cut away). ``padded=True`` counts the padded reference layout, every sequence GEMM on
    B·(K+T) tokens whether they are real or not (what architecture 1 executed on CUDA).
    """
    from loka.models.layers import BatchMatmul

    total = [0.0]
    seen = {"linear": set(), "bmm": set()}

    def linear_hook(module, inputs, _out):
        x = inputs[0]  # [..., K]
        total[0] += 2.0 * (x.numel() // x.shape[-1]) * module.in_features * module.out_features
        seen["linear"].add(id(module))

    def bmm_hook(module, inputs, _out):
        a, b = inputs[0], inputs[1]  # a [..., M, K], b [..., K, N]
        batch_dims = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        total[0] += 2.0 * math.prod(batch_dims) * a.shape[-2] * a.shape[-1] * b.shape[-1]
        seen["bmm"].add(id(module))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, BatchMatmul):
            handles.append(module.register_forward_hook(bmm_hook))
    was_training = model.training
    packers = [m for m in model.modules() if hasattr(m, "pack_history")]
    packing = [m.pack_history for m in packers]
    try:
        model.eval()
        for m in packers:
            m.pack_history = m.pack_history and not padded
        with torch.no_grad():
            model(batch)
    finally:
        model.train(was_training)
        for m, flag in zip(packers, packing):
            m.pack_history = flag
        for h in handles:
            h.remove()
    return GemmFlops(total[0] / n_examples, len(seen["linear"]), len(seen["bmm"]))
