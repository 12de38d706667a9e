"""Building blocks shared by the ranker's arches: GEMM + normalization, and named matmuls.

Every GEMM that matters is a module with a fully-qualified name (fqn), so `loka.probe` can
hook it and `loka.dispatch` can swap it: weight GEMMs are `nn.Linear`; activation-by-activation
products (the FM interaction, attention) go through `BatchMatmul`, a module with no weights
whose only job is to give that product a site name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchMatmul(nn.Module):
    """Named batched matmul: out[..., M, N] = a[..., M, K] @ b[..., K, N] (no weights).

    >>> BatchMatmul()(torch.randn(2, 3, 4), torch.randn(2, 4, 5)).shape
    torch.Size([2, 3, 5])
    """

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


class MLPBlock(nn.Module):
    """Linear -> LayerNorm -> SiLU, the GEMM-plus-normalization unit of recommendation models.

    x [B, d_in] -> [B, d_out]  (any leading dims).
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(self.norm(self.linear(x)))


class MLP(nn.Module):
    """A stack of `MLPBlock` over ``widths`` followed by an optional plain output Linear.

    >>> MLP(8, (16, 16), d_out=4)(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """

    def __init__(self, d_in: int, widths: tuple[int, ...], d_out: int | None = None) -> None:
        super().__init__()
        blocks = []
        for width in widths:
            blocks.append(MLPBlock(d_in, width))
            d_in = width
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(d_in, d_out) if d_out is not None else None
        self.d_out = d_out if d_out is not None else d_in

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return self.out(x) if self.out is not None else x


def signed_log1p(x: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|): tames heavy tails (counts, prices, outliers) before any GEMM."""
    return torch.sign(x) * torch.log1p(torch.abs(x))
