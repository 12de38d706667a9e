"""Small user models (not the ranker) with the block patterns the mods look for."""

from __future__ import annotations

import torch
from torch import nn


class NormLinearBlock(nn.Module):
    """norm -> (a, b) sharing the norm output; then l2 -> rms norm."""

    def __init__(self, d: int = 24, h: int = 40, norm: str = "layernorm") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d) if norm == "layernorm" else nn.RMSNorm(d)
        self.a = nn.Linear(d, h)
        self.b = nn.Linear(d, h, bias=False)
        self.l2 = nn.Linear(h, h, bias=False)
        self.n2 = nn.RMSNorm(h)

    def forward(self, x):
        y = self.norm(x)
        return self.n2(self.l2(self.a(y) * torch.sigmoid(self.b(y))))


class ResidualNorm(nn.Module):
    """The norm output also feeds a residual add: migration must not touch it."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        y = self.norm(x)
        return y + self.proj(y)


class TransposedShared(nn.Module):
    """Three Linears read x.transpose(1, 2).contiguous(), each computed separately (as Wukong does)."""

    def __init__(self, n: int = 12) -> None:
        super().__init__()
        self.p = nn.Linear(n, 5, bias=False)
        self.q = nn.Linear(n, 7, bias=False)
        self.r = nn.Linear(n, 3, bias=False)

    def forward(self, x):  # x [B, n, D]
        p = self.p(x.transpose(1, 2).contiguous())
        q = self.q(x.transpose(1, 2).contiguous())
        r = self.r(x.transpose(1, 2).contiguous())
        return torch.cat([p, q, r], dim=-1)


def outlier_block(d: int = 64, big: float = 1e4, n_out: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear in fp64 where ``n_out`` channels are ``big`` times larger (and their
    weight columns ``big`` times smaller, so the output stays balanced)."""
    m = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)).double()
    with torch.no_grad():
        m[0].weight.uniform_(0.5, 1.5)
        m[0].bias.normal_(0, 0.1)
        m[0].weight[:n_out] *= big
        m[1].weight[:, :n_out] /= big
    return m
