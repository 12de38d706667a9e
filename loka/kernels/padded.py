"""Zero padding of K and N inside the kernel call, so odd widths (429, 557) run in FP8.

``torch._scaled_mm`` takes K and N only in multiples of 16, and rankers are full of
widths that are not (429, 557, 13 dense features, 1-logit heads). The padding mod
(``loka.mods.padding``) pads the *model*, which replaces its Parameters: an optimizer,
an EMA or a regularisation list made earlier keeps the old tensors and silently stops
updating them. Padding the *operands* inside the GEMM call keeps the model as it is:

    out[M, N] = ([a, 0] · [[b, 0], [0, 0]]ᵀ)[:, :N]          a [M, K], b [N, K]

Zero columns change no dot product and no amax, so no FP8 scale: the result equals the
unpadded GEMM in every recipe whose scale groups run along K from the left (tensorwise,
rowwise, 1x128 blocks, mx). The cost is a copy of each operand per call, which is why
the plan should still only pick such a kernel where the site is large enough to win.

The built-in ``scaled_mm+pad`` and ``scaled_mm_fast_accum+pad`` are registered with the
other kernels, so the probe times them at odd shapes (not at aligned ones, where the
unpadded kernel is the same GEMM) and the planner can choose them: a 429-wide layer is a
candidate like any other. ``kernel_by_name("<kernel>+pad")`` registers the padded variant
of any other kernel on first use; ``loka.nn.resolve_kernels`` and plans accept such names.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from loka.kernels.kernel import KERNELS, GemmKernel, Quantized  # the module itself: the registry imports this file

PAD_SUFFIX = "+pad"
ALIGN = 16


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


class PaddedKernel(GemmKernel):
    """``inner`` with K and N zero-padded to multiples of ``ALIGN`` inside each call."""

    def __init__(self, inner: GemmKernel) -> None:
        if inner.hp:
            raise ValueError(f"{inner.name!r} runs in hp and takes any shape; padding it does nothing")
        self.inner = inner
        self.name = inner.name + PAD_SUFFIX
        self.backend = getattr(inner, "backend", inner.name)
        self.gemms = inner.gemms
        # what it runs and how it casts are the inner kernel's; it is never the reference or modelled
        self.archs, self.fuses_a_cast, self.torch_scaled_mm = inner.archs, inner.fuses_a_cast, inner.torch_scaled_mm

    def library_version(self) -> str:
        return self.inner.library_version()

    def available(self, device=None):
        return self.inner.available(device)

    def supports(self, recipe, shape, dtype, device):
        m, k, n = shape
        return self.inner.supports(recipe, (m, round_up(k), round_up(n)), dtype, device)

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        k = a.shape[1]
        n = (b.data if isinstance(b, Quantized) else b).shape[0]
        pad_k, pad_n = round_up(k) - k, round_up(n) - n
        if pad_k or pad_n:
            a = F.pad(a, (0, pad_k))  # [M, K16], zero columns
            b, scale_b = _pad_b(b, scale_b, pad_k, pad_n, _row_scaled(recipe.b))
        out = self.inner.mm(a, b, recipe, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
        return out[:, :n] if pad_n else out


def _row_scaled(op) -> bool:
    """Whether the operand's scale has one row per operand row (padding N adds scale rows)."""
    return op.granularity in ("rowwise", "mx") or (op.granularity == "blockwise" and op.block[0] == 1)


def _pad_b(b, scale_b, pad_k: int, pad_n: int, row_scaled: bool):
    """b [N, K] -> [N16, K16] with zeros; a per-row scale of b gets rows of ones (they scale zeros).

    Padding to 16 never adds a 32- or 128-wide block, so block scales keep their shape.
    """
    def rows(s):
        if s is None or s.dim() == 0 or not row_scaled or not pad_n:
            return s
        return torch.cat([s, torch.ones((pad_n, *s.shape[1:]), dtype=s.dtype, device=s.device)])

    if isinstance(b, Quantized):
        data = F.pad(b.data.view(torch.uint8), (0, pad_k, 0, pad_n)).view(b.data.dtype)  # fp8 zero is all-zero bits
        return Quantized(data, rows(b.scale)), scale_b
    return F.pad(b, (0, pad_k, 0, pad_n)), rows(scale_b)


def needs_padding(kernel: GemmKernel, recipe, shape, dtype, device) -> bool:
    """False for a padded kernel at a shape its inner kernel takes as it is (timing it would add nothing)."""
    return kernel.inner is None or not kernel.inner.supports(recipe, shape, dtype, device)


def kernel_by_name(name: str) -> GemmKernel:
    """The registered kernel ``name``; a ``"<kernel>+pad"`` name registers the padded variant once."""
    if name in KERNELS or not name.endswith(PAD_SUFFIX):
        return KERNELS.get(name)
    return KERNELS.register(PaddedKernel(KERNELS.get(name[: -len(PAD_SUFFIX)])))


__all__ = ["PaddedKernel", "kernel_by_name", "needs_padding", "round_up"]
