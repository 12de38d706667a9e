"""Sequence arch: the user's history of past events, summarized into a few tokens.

InterFormer-style (arXiv 2411.09852): the history (item id, action type, time gap) is read by
pre-norm attention + feed-forward blocks whose feed-forward is *personalized* by a summary of
the non-sequence features (which include the candidate ad), and the blocks start from
personalized CLS tokens, so the summary the history yields depends on who is asking about
what. Padding is masked everywhere; the CLS tokens are always valid, so no attention row is
empty even for users without history.

Attention's QKᵀ and AV products run in fused scaled-dot-product attention; every weight GEMM
(qkv, out, ffn_in, ffn_gate, ffn_out, projections) is an `nn.Linear` site. The tokens are
jagged (`HistoryLayout`): each example's CLS tokens and its real events only, so each Linear
runs once per step on the real ``[N, d]`` tokens; attention takes variable lengths (nested
jagged SDPA, flash on CUDA; chunks of similar lengths on CPU, the same values).
With ``RankerConfig.checkpoint_blocks`` each block's activations are recomputed in backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

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
        qkv = self.qkv(self.norm1(x))  # [N, 3d], all examples in one GEMM
        x = x + self.attn_out(jagged_attention(qkv, layout, self.heads))
        gate = layout.per_token(1.0 + self.ffn_gate(summary))  # [N, ffn_mult*d]
        h = F.silu(self.ffn_in(self.norm2(x))) * gate
        return x + self.ffn_out(h)


def jagged_attention(qkv: Tensor, layout: HistoryLayout, heads: int) -> Tensor:
    """Attention within each example's tokens: qkv [N, 3d] -> [N, d].

    CUDA + jagged layout: nested jagged SDPA (variable-length flash). Otherwise chunks padded
    to their longest example with padded keys masked (CPU, and the padded reference).
    """
    d = qkv.shape[-1] // 3
    if layout.attention == "flash-estimate":
        return _FlashEstimate.apply(qkv, heads)
    if layout.jagged and qkv.device.type == "cuda":
        return _nested_attention(qkv, layout, heads)
    parts = []
    for (n, s), part, mask in zip(layout.chunks, layout.to_chunks(qkv).split(layout.tokens_per_chunk),
                                  layout.chunk_keys.split(layout.tokens_per_chunk)):
        # one copy to [3, n, H, s, dh] instead of one per q, k, v
        q, k, v = part.view(n, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4).contiguous()
        parts.append(attention(q, k, v, mask.view(n, s)).transpose(1, 2).reshape(n * s, d))
    return layout.from_chunks(torch.cat(parts) if len(parts) > 1 else parts[0])


def _nested_attention(qkv: Tensor, layout: HistoryLayout, heads: int) -> Tensor:
    """qkv [N, 3d] -> [N, d] through SDPA on nested jagged tensors [B, j, H, dh]."""
    n, d = qkv.shape[0], qkv.shape[-1] // 3
    q, k, v = qkv.view(n, 3, heads, d // heads).unbind(1)  # each [N, H, dh]
    nested = [torch.nested.nested_tensor_from_jagged(t.contiguous(), layout.nested_offsets,
                                                max_seqlen=max(layout.max_len, 16))  # spares: < 16
              .transpose(1, 2) for t in (q, k, v)]  # [B, H, j, dh]
    out = F.scaled_dot_product_attention(*nested)
    return out.transpose(1, 2).values().reshape(n, d)


class _FlashEstimate(torch.autograd.Function):
    """Shapes and saved tensors of a variable-length flash kernel, without values (fake tensors).

    Flash attention keeps q, k, v, the output and a float32 logsumexp per (token, head) for
    backward; the math form would keep [B, H, S, S] scores, which the GPU never does.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, heads: int) -> Tensor:
        out = qkv.new_empty(qkv.shape[0], qkv.shape[-1] // 3)
        lse = qkv.new_empty(qkv.shape[0], heads, dtype=torch.float32)
        ctx.save_for_backward(qkv, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qkv, _, _ = ctx.saved_tensors
        return torch.empty_like(qkv), None


class SequenceArch(nn.Module):
    """History -> seq_summary_tokens embeddings of width D.

    events [N_h, D] (the kept history slots of ``layout``, embedded by the fused `SparseArch`
    lookup: item + action + time-gap bucket), context [B, n_ctx, D] (non-sequence embeddings),
    layout (`HistoryLayout` of the history mask, see `layout`) -> [B, K, D].
    """

    def __init__(self, cfg: RankerConfig, n_context: int) -> None:
        super().__init__()
        d, dm, k = cfg.embed_dim, cfg.seq_dim, cfg.seq_summary_tokens
        self.k, self.dm, self.n_gap_buckets = k, dm, cfg.n_gap_buckets
        self.input_proj = nn.Linear(d, dm)
        self.summary_proj = nn.Linear(n_context * d, dm)
        self.cls_proj = nn.Linear(dm, k * dm)
        self.blocks = nn.ModuleList(
            SequenceBlock(dm, cfg.seq_heads, cfg.seq_ffn_mult) for _ in range(cfg.seq_layers))
        self.norm = nn.LayerNorm(dm)
        self.out_proj = nn.Linear(2 * dm, d)
        self.pack_history = True  # False: always the padded layout (the reference)
        self.checkpoint_blocks = cfg.checkpoint_blocks

    def event_ids(self, layout: HistoryLayout, item_ids: Tensor, actions: Tensor,
                  gaps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The kept slots' (item, action, gap bucket) ids, each [N_h], for the fused lookup."""
        return (layout.kept_history(item_ids), layout.kept_history(actions),
                gap_buckets(layout.kept_history(gaps), self.n_gap_buckets))

    def forward(self, events: Tensor, context: Tensor, layout: HistoryLayout) -> Tensor:
        b = context.shape[0]
        summary = F.silu(self.summary_proj(context.flatten(1)))  # [B, dm]
        cls = self.cls_proj(summary).view(b, self.k, self.dm)  # [B, K, dm]
        x = layout.pack(cls, self.input_proj(events))  # [N, dm], N <= B*(K+T)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, summary, use_reentrant=False)
            else:
                x = block(x, layout, summary)
        x = self.norm(x)
        pooled = layout.pool_events(x, b)  # [B, dm]; zeros without history
        cls_out = layout.cls_tokens(x, self.k)  # [B, K, dm]
        both = torch.cat([cls_out, pooled.unsqueeze(1).expand(b, self.k, self.dm)], dim=-1)
        return self.out_proj(both)  # [B, K, D]

    def layout(self, mask: Tensor) -> HistoryLayout:
        """Jagged (real tokens only); padded when ``pack_history`` is off (the reference), on the
        meta device (no sizes to read), or under torch.compile, where data-dependent sizes
        would break the graph (pass a layout built outside instead: `Ranker.history_layout`)."""
        if self.pack_history and not torch.compiler.is_compiling() and mask.device.type != "meta":
            return HistoryLayout.jagged_tokens(mask, self.k)
        return HistoryLayout.padded(mask, self.k)
