"""Sequence arch: the user's history of past events, summarized into a few tokens.

InterFormer-style (arXiv 2411.09852): the history (item id, action type, time gap) is read by
pre-norm attention + feed-forward blocks whose feed-forward is *personalized* by a summary of
the non-sequence features (which include the candidate ad), and the blocks start from
personalized CLS tokens, so the summary the history yields depends on who is asking about
what. Padding is masked everywhere; the CLS tokens are always valid, so no attention row is
empty even for users without history.

Attention's QKᵀ and AV products run in fused scaled-dot-product attention; every weight GEMM
(qkv, out, ffn_in, ffn_gate, ffn_out, projections) is an `nn.Linear` site. On CPU the tokens
are packed with trailing padding cut away (`HistoryLayout`): most histories are far shorter
than ``history_len``, so the blocks run on about a third of the padded tokens; each Linear
still runs once per step, on the packed ``[N, d]`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RankerConfig
from .history_layout import HistoryLayout

MAX_GAP_DAYS = 1000.0


def gap_buckets(gaps_days: Tensor, n_buckets: int) -> Tensor:
    """Log-spaced time-gap buckets: [B, T] float days -> [B, T] int64 in [0, n_buckets)."""
    scaled = torch.log1p(gaps_days.float().clamp(0.0, MAX_GAP_DAYS)) / math.log1p(MAX_GAP_DAYS)
    return torch.round(scaled * (n_buckets - 1)).long().clamp(0, n_buckets - 1)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Softmax(q kᵀ / sqrt(dh)) v over valid keys. q, k, v [B, H, S, dh], key_mask [B, S] -> [B, H, S, dh].

    Fused SDPA on GPUs; on CPU the explicit form, which is several times faster than the CPU
    flash kernel at history lengths of tens and identical in value. There the scale and the
    mask ride in one ``baddbmm`` (an additive -inf bias), instead of a multiply and a
    masked_fill over the [B, H, S, S] scores in each direction.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    b, h, s, dh = q.shape
    bias = torch.zeros(b, 1, 1, s, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf")).expand(b, h, s, s)
    scores = torch.baddbmm(bias.reshape(b * h, s, s), q.reshape(b * h, s, dh),
                           k.reshape(b * h, s, dh).transpose(1, 2), alpha=dh ** -0.5)  # [B*H, S, S]
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * h, s, dh)).view(b, h, s, dh)


class SequenceBlock(nn.Module):
    """Pre-norm attention + personalized feed-forward on packed tokens.

    x [N, d] packed as ``layout`` says, summary [B, d] -> [N, d].
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

    def forward(self, x: Tensor, layout: HistoryLayout, summary: Tensor) -> Tensor:
        d, heads = x.shape[-1], self.heads
        qkv = self.qkv(self.norm1(x))  # [N, 3d], all chunks in one GEMM
        parts = []
        for (n, s), part, mask in zip(layout.chunks, qkv.split(layout.tokens_per_chunk),
                                      layout.key_mask.split(layout.tokens_per_chunk)):
            # one copy to [3, n, H, s, dh] instead of one per q, k, v
            q, k, v = part.view(n, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4).contiguous()
            parts.append(attention(q, k, v, mask.view(n, s)).transpose(1, 2).reshape(n * s, d))
        x = x + self.attn_out(torch.cat(parts) if len(parts) > 1 else parts[0])
        gate = layout.per_token(1.0 + self.ffn_gate(summary))  # [N, ffn_mult*d]
        h = F.silu(self.ffn_in(self.norm2(x))) * gate
        return x + self.ffn_out(h)


class SequenceArch(nn.Module):
    """History -> seq_summary_tokens embeddings of width D.

    item_ids [B, T] int64, actions [B, T] int64, gaps [B, T] float days, mask [B, T] bool,
    context [B, n_ctx, D] (non-sequence embeddings), embed_items (the shared item table:
    ids [...] -> [..., D]) -> [B, K, D]. Only the slots the layout keeps are embedded.
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
        self.pack_history = True  # False: always the padded layout (the reference)

    def forward(self, item_ids: Tensor, actions: Tensor, gaps: Tensor, mask: Tensor,
                context: Tensor, embed_items: Callable[[Tensor], Tensor]) -> Tensor:
        b = context.shape[0]
        layout = self.layout(mask)
        events = (embed_items(layout.kept_history(item_ids)) + self.action_emb(layout.kept_history(actions))
                  + self.gap_emb(gap_buckets(layout.kept_history(gaps), self.n_gap_buckets)))  # [N_h, D]
        summary = F.silu(self.summary_proj(context.flatten(1)))  # [B, dm]
        cls = self.cls_proj(summary).view(b, self.k, self.dm)  # [B, K, dm]
        x = layout.pack(cls, self.input_proj(events))  # [N, dm], N <= B*(K+T)
        for block in self.blocks:
            x = block(x, layout, summary)
        x = self.norm(x)
        pooled = layout.pool_events(x, b)  # [B, dm]; zeros without history
        cls_out = layout.cls_tokens(x, self.k)  # [B, K, dm]
        both = torch.cat([cls_out, pooled.unsqueeze(1).expand(b, self.k, self.dm)], dim=-1)
        return self.out_proj(both)  # [B, K, D]

    def layout(self, mask: Tensor) -> HistoryLayout:
        """Packed (padding cut) on CPU; padded where sizes read from the mask would sync a device."""
        if self.pack_history and mask.device.type == "cpu" and not torch.compiler.is_compiling():
            return HistoryLayout.packed(mask, self.k)
        return HistoryLayout.padded(mask, self.k)
