"""Error metrics between a high-precision reference and an approximation.

Used by tests, the probe and the plan, so all compute in float64 and treat the
degenerate cases (zero reference, non-finite values) the same way everywhere.
"""

from __future__ import annotations

import math

import torch


def _pair(ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != x.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs {tuple(x.shape)}")
    return ref.detach().double(), x.detach().double()


def rel_error(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Relative Frobenius error ``||x - ref|| / ||ref||`` (0 if both are zero, inf if only ref is)."""
    r, y = _pair(ref, x)
    num = torch.linalg.vector_norm(y - r).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``-20 log10(rel_error)``."""
    e = rel_error(ref, x)
    if e == 0:
        return math.inf
    return -20.0 * math.log10(e)


def max_abs_error(ref: torch.Tensor, x: torch.Tensor) -> float:
    r, y = _pair(ref, x)
    return (y - r).abs().max().item() if r.numel() else 0.0


def cosine(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1 if both are zero)."""
    r, y = _pair(ref, x)
    nr, ny = torch.linalg.vector_norm(r).item(), torch.linalg.vector_norm(y).item()
    if nr == 0 or ny == 0:
        return 1.0 if nr == ny else 0.0
    return (torch.dot(r.flatten(), y.flatten()) / (nr * ny)).item()
