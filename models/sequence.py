"""Sequence arch: the user's history of past events, summarized into a few tokens.

InterFormer-style (arXiv 2411.09852): the history (item id, action type, time gap) is read by
pre-norm attention + feed-forward blocks whose feed-forward is *personalized* by a summary of
the non-sequence features (which include the candidate ad), and the blocks start from
personalized CLS tokens, so the summary the history yields depends on who is asking about
what. Padding is masked everywhere; the CLS tokens are always valid, so no attention row is
empty even for users without history.

Attention's QKᵀ and AV products run in fused scaled-dot-product attention; every weight GEMM
(qkv, out, ffn_in, ffn_gate, ffn_out, projections) is an `nn.Linear` site.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RankerConfig
from .layers import masked_mean

MAX_GAP_DAYS = 1000.0


def gap_buckets(gaps_days: Tensor, n_buckets: int) -> Tensor:
    """Log-spaced time-gap buckets: [B, T] float days -> [B, T] int64 in [0, n_buckets)."""
    scaled = torch.log1p(gaps_days.float().clamp(0.0, MAX_GAP_DAYS)) / math.log1p(MAX_GAP_DAYS)
    return torch.round(scaled * (n_buckets - 1)).long().clamp(0, n_buckets - 1)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Softmax(q kᵀ / sqrt(dh)) v over valid keys. q, k, v [B, H, S, dh], key_mask [B, S] -> [B, H, S, dh].

    Fused SDPA on GPUs; on CPU the explicit form, which is several times faster than the CPU
    flash kernel at history lengths of tens and identical in value.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, H, S, S]
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class SequenceBlock(nn.Module):
    """Pre-norm attention + personalized feed-forward.

    x [B, S, d], key_mask [B, S] bool, summary [B, d] -> [B, S, d].
    """

    def __init__(self, d: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, ffn_mult * d)
        self.ffn_gate = nn.Linear(d, ffn_mult * d)  # personalization from the summary
        self.ffn_out = nn.Linear(ffn_mult * d, d)

    def forward(self, x: Tensor, key_mask: Tensor, summary: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, dh]
        attn = attention(q, k, v, key_mask)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, s, d))
        gate = self.ffn_gate(summary).unsqueeze(1)  # [B, 1, ffn_mult*d]
        h = F.silu(self.ffn_in(self.norm2(x))) * (1.0 + gate)
        return x + self.ffn_out(h)


class SequenceArch(nn.Module):
    """History -> seq_summary_tokens embeddings of width D.

    item_emb [B, T, D] (from the shared item table), actions [B, T] int64, gaps [B, T] float days,
    mask [B, T] bool, context [B, n_ctx, D] (non-sequence embeddings) -> [B, K, D].
    """

    def __init__(self, cfg: RankerConfig, n_context: int) -> None:
        super().__init__()
        d, dm, k = cfg.embed_dim, cfg.seq_dim, cfg.seq_summary_tokens
        self.k, self.dm, self.n_gap_buckets = k, dm, cfg.n_gap_buckets
        self.action_emb = nn.Embedding(cfg.n_actions, d)
        self.gap_emb = nn.Embedding(cfg.n_gap_buckets, d)
        self.input_proj = nn.Linear(d, dm)
        self.summary_proj = nn.Linear(n_context * d, dm)
        self.cls_proj = nn.Linear(dm, k * dm)
        self.blocks = nn.ModuleList(
            SequenceBlock(dm, cfg.seq_heads, cfg.seq_ffn_mult) for _ in range(cfg.seq_layers))
        self.norm = nn.LayerNorm(dm)
        self.out_proj = nn.Linear(2 * dm, d)

    def forward(self, item_emb: Tensor, actions: Tensor, gaps: Tensor, mask: Tensor,
                context: Tensor) -> Tensor:
        b = context.shape[0]
        events = item_emb + self.action_emb(actions) + self.gap_emb(gap_buckets(gaps, self.n_gap_buckets))
        tokens = self.input_proj(events)  # [B, T, dm]
        summary = F.silu(self.summary_proj(context.flatten(1)))  # [B, dm]
        cls = self.cls_proj(summary).view(b, self.k, self.dm)  # [B, K, dm]
        x = torch.cat([cls, tokens], dim=1)  # [B, K+T, dm]
        key_mask = torch.cat([torch.ones(b, self.k, dtype=torch.bool, device=mask.device), mask], 1)
        for block in self.blocks:
            x = block(x, key_mask, summary)
        x = self.norm(x)
        pooled = masked_mean(x[:, self.k:], mask, dim=1)  # [B, dm]; zeros without history
        both = torch.cat([x[:, : self.k], pooled.unsqueeze(1).expand(b, self.k, self.dm)], dim=-1)
        return self.out_proj(both)  # [B, K, D]
