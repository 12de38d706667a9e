"""Interaction arch: a stack of Wukong layers (arXiv 2403.02545).

Each layer turns n embeddings [B, n, D] into n' = fm_embeddings + lcb_embeddings embeddings:
- the factorization-machine block (FMB) computes the low-rank FM X·(Xᵀ·Y) with a learned
  projection Y [n, k] (Wukong's optimized FM, O(n·k·D) instead of O(n²·D)), then LayerNorm and
  an MLP that emits fm_embeddings embeddings;
- the linear compression block (LCB) linearly recombines the n embeddings into lcb_embeddings;
- both are concatenated, added to a (projected) residual, and LayerNorm'ed over D.
Stacking layers raises the interaction order exponentially, which is what lets Wukong scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import RankerConfig
from .layers import MLP, BatchMatmul


class FMInteraction(nn.Module):
    """Low-rank FM: x [B, n, D] -> x · (xᵀ · Y) [B, n, k].

    ``proj`` (Linear n -> k, no bias) is the GEMM xᵀ[B·D, n] · Yᵀ; ``bmm`` is the batched
    activation product x[B, n, D] · (xᵀY)[B, D, k], a named site with no weights.
    """

    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, k, bias=False)
        self.bmm = BatchMatmul()

    def forward(self, x: Tensor) -> Tensor:
        xt_y = self.proj(x.transpose(1, 2).contiguous())  # [B, D, k]
        return self.bmm(x, xt_y)  # [B, n, k]


class FMBlock(nn.Module):
    """x [B, n, D] -> [B, n_out, D] through FM, LayerNorm, MLP."""

    def __init__(self, n: int, d: int, k: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.n_out, self.d = n_out, d
        self.fm = FMInteraction(n, k)
        self.norm = nn.LayerNorm(n * k)
        self.mlp = MLP(n * k, (hidden,), d_out=n_out * d)

    def forward(self, x: Tensor) -> Tensor:
        z = self.norm(self.fm(x).flatten(1))
        return self.mlp(z).view(-1, self.n_out, self.d)


class LinearCompressionBlock(nn.Module):
    """x [B, n, D] -> [B, n_out, D]: a learned linear recombination of the n embeddings."""

    def __init__(self, n: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n, n_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.transpose(1, 2).contiguous()).transpose(1, 2)


class WukongLayer(nn.Module):
    """x [B, n, D] -> LayerNorm(cat(FMB(x), LCB(x)) + residual(x)) [B, n_fm + n_lcb, D]."""

    def __init__(self, n: int, d: int, cfg: RankerConfig) -> None:
        super().__init__()
        n_out = cfg.fm_embeddings + cfg.lcb_embeddings
        self.fmb = FMBlock(n, d, cfg.fm_rank, cfg.fm_hidden, cfg.fm_embeddings)
        self.lcb = LinearCompressionBlock(n, cfg.lcb_embeddings)
        self.residual = LinearCompressionBlock(n, n_out) if n != n_out else nn.Identity()
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([self.fmb(x), self.lcb(x)], dim=1)
        return self.norm(y + self.residual(x))


class InteractionArch(nn.Module):
    """x [B, n_embeddings, D] -> [B, fm_embeddings + lcb_embeddings, D].

    >>> cfg = RankerConfig.from_size("tiny")
    >>> InteractionArch(cfg)(torch.randn(3, cfg.n_embeddings, cfg.embed_dim)).shape
    torch.Size([3, 8, 8])
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        n, n_out = cfg.n_embeddings, cfg.fm_embeddings + cfg.lcb_embeddings
        layers = []
        for _ in range(cfg.wukong_layers):
            layers.append(WukongLayer(n, cfg.embed_dim, cfg))
            n = n_out
        self.layers = nn.ModuleList(layers)
        self.n_out = n_out
        self.checkpoint_blocks = cfg.checkpoint_blocks

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)  # recomputed in backward
            else:
                x = layer(x)
        return x
