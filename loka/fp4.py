"""NVFP4: FP4 (``e2m1``) elements in 1x16 blocks, each block with an e4m3 scale, under one fp32
tensor scale; Blackwell (sm100) multiplies these natively.

Two levels because an e4m3 block scale alone spans 2**-9..448: the fp32 tensor scale moves the
tensor's range onto it, so that the block with the tensor's amax gets the largest block scale.
The rule, NVIDIA's, as torchao 0.18's ``nvfp4_quantize(x, 16, per_tensor_amax_to_scale(amax))``
computes it (tests/core/test_fp4.py checks it bit for bit against torchao and against an
ml_dtypes oracle)::

    s_tensor = amax(x) / (448 * 6)                                   (fp32; 1 for an all-zero x)
    s_block  = e4m3(clamp(amax(block) / 6 / s_tensor, 2**-6, 448))   (round to nearest even)
    codes    = e2m1(clamp(x * ((1 / s_tensor) / s_block), -6, 6))
    x       ≈ value(codes) * s_block * s_tensor

Every step is one IEEE-rounded float32 operation on tensors (a division by a Python float would
become a multiply by its reciprocal on CUDA, loka/quantize.py's module doc), so the bits are the
same on every device. amax ignores NaN/Inf (loka's ``nonfinite="skip"``); FP4 has neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loka.formats import E2M1, E4M3

NVFP4_BLOCK = (1, 16)
_TENSOR_DIVISOR = E4M3.max * E2M1.max  # 2688: the largest block scale times the largest element
_MIN_BLOCK_SCALE = E4M3.min_normal  # torchao clamps block scales to e4m3's smallest normal


@dataclass(frozen=True)
class Nvfp4Scale:
    """The two scales of an NVFP4 tensor ``x[..., C]``: ``block[..., ceil(C/16)]`` (float32 holding
    e4m3 values) and ``tensor`` (float32 scalar). ``x ≈ value(codes) * block * tensor``."""

    block: torch.Tensor
    tensor: torch.Tensor

    def copy_(self, other: "Nvfp4Scale") -> "Nvfp4Scale":
        """Overwrite both scales in place (as ``Tensor.copy_``: a cached FP4 weight refreshed)."""
        self.block.copy_(other.block)
        self.tensor.copy_(other.tensor)
        return self

    def block_e4m3(self) -> torch.Tensor:
        """The block scales as torch.float8_e4m3fn (what an NVFP4 kernel takes); exact."""
        return self.block.to(torch.float8_e4m3fn)

    def block_expanded(self, shape: torch.Size) -> torch.Tensor:
        """The block scales broadcast to a tensor of ``shape`` (each repeated over its 16 columns)."""
        return self.block.repeat_interleave(NVFP4_BLOCK[1], dim=-1)[..., : shape[-1]]


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.detach().abs().float(), nan=0.0, posinf=0.0)


def _block_amax(ax: torch.Tensor) -> torch.Tensor:
    """Per 1x16 block max of ``ax[..., C]`` (C padded with zeros to a multiple of 16)."""
    pad = (-ax.shape[-1]) % NVFP4_BLOCK[1]
    if pad:
        ax = torch.nn.functional.pad(ax, (0, pad))
    return ax.reshape(*ax.shape[:-1], -1, NVFP4_BLOCK[1]).amax(dim=-1)


def nvfp4_scales(x: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> Nvfp4Scale:
    """The scales of ``x[..., C]`` under the NVFP4 rule (module doc); ``tensor_amax`` given
    (calibrated) replaces ``amax(x)`` in the tensor scale."""
    ax = _finite_abs(x)
    amax = ax.amax() if tensor_amax is None else tensor_amax.detach().float().to(x.device).reshape(())
    divisor = torch.tensor(_TENSOR_DIVISOR, device=x.device)
    # clamp: a tensor scale below float32's normals would make its reciprocal overflow
    s_tensor = torch.where(amax > 0, amax / divisor, torch.ones_like(amax)).clamp_min(2.0**-126)
    block = _block_amax(ax) / torch.tensor(E2M1.max, device=x.device) / s_tensor
    block = block.clamp(_MIN_BLOCK_SCALE, E4M3.max).to(torch.float8_e4m3fn).float()
    return Nvfp4Scale(block=block, tensor=s_tensor)


def nvfp4_scaled(x: torch.Tensor, scale: Nvfp4Scale) -> torch.Tensor:
    """``x * ((1 / s_tensor) / s_block)`` in float32: the values the e2m1 cast rounds."""
    rcp = torch.reciprocal(scale.tensor) / scale.block
    return x.float() * rcp.repeat_interleave(NVFP4_BLOCK[1], dim=-1)[..., : x.shape[-1]]


def nvfp4_dequantize(values: torch.Tensor, scale: Nvfp4Scale) -> torch.Tensor:
    """float32 ``x`` from its e2m1 values (float32) and scales: ``(value * s_block) * s_tensor``."""
    # value * s_block is exact (2 by 4 significant bits): one rounding, in the final multiply
    return (values * scale.block_expanded(values.shape)) * scale.tensor
