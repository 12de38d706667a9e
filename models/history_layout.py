"""Where each token of the sequence arch lives once padding is cut away.

Histories are short for most users and long for a few (log-normal lengths, capped at
``history_len``), so a batch padded to the cap is mostly padding: at batch 512 and a cap of
32, three tokens in four are padding, and attention's cost grows with the square of the
padded length. `HistoryLayout` sorts the examples by history length and cuts them into a few
chunks, each padded only to its own longest history; the tokens of all chunks are packed
into one ``[N, d]`` tensor, so every per-token GEMM (``qkv``, ``attn_out``, ``ffn_*``) still
runs once, as one named site, on fewer rows, and only attention runs chunk by chunk.

Cutting trailing padding changes nothing a valid token sees: padded keys are masked out of
attention, and every other op is per token. `HistoryLayout.padded` keeps every slot (one
chunk in batch order); it is the reference the packed layout is tested against, and the
layout used where the data-dependent chunk sizes would cost a device sync (GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HistoryLayout:
    """Packed token layout of K summary (CLS) tokens followed by a history of T slots per example.

    Packed order: chunk by chunk, example by example, its K CLS tokens then its kept slots.
    hist_rows [N_h]: the kept history slots, as rows of the flattened history ``[B * T]``.
    rows [N]: each packed token as a row of ``cat([cls [B * K], kept history [N_h]])``.
    example [N]: the example (batch index) each packed token belongs to.
    key_mask [N] bool: the token is a CLS token or a real event.
    chunks: (examples, tokens per example) of each chunk, in packing order; N = sum of products.
    cls_rows [B * K]: packed rows of the CLS tokens, in batch order.
    pool_weight [N]: 1 / (events of the example) on real events, 0 elsewhere (masked mean).
    """

    hist_rows: Tensor
    rows: Tensor
    example: Tensor
    key_mask: Tensor
    chunks: tuple[tuple[int, int], ...]
    cls_rows: Tensor
    pool_weight: Tensor

    @classmethod
    def padded(cls, mask: Tensor, k: int) -> "HistoryLayout":
        """Every slot kept, one chunk in batch order. mask [B, T] bool (True = real event)."""
        b, t = mask.shape
        order = torch.arange(b, device=mask.device)
        return cls._build(mask, k, order, ((b, k + t),))

    @classmethod
    def packed(cls, mask: Tensor, k: int, max_chunks: int = 8, min_chunk: int = 64) -> "HistoryLayout":
        """Examples sorted by history length, cut into at most ``max_chunks`` chunks of at least
        ``min_chunk`` examples, each cut after its longest history. mask [B, T] bool."""
        if max_chunks < 1 or min_chunk < 1:
            raise ValueError("HistoryLayout.packed needs max_chunks >= 1 and min_chunk >= 1.")
        b, t = mask.shape
        slots = torch.arange(1, t + 1, device=mask.device)
        length = (mask * slots).amax(1) if t else torch.zeros(b, dtype=torch.long, device=mask.device)
        length, order = length.sort(stable=True)  # trailing padding beyond `length` is dropped
        n_chunks = max(1, min(max_chunks, b // min_chunk))
        bounds = [round(b * i / n_chunks) for i in range(n_chunks + 1)]
        ends = length[torch.tensor(bounds[1:], device=mask.device) - 1].tolist()
        chunks = tuple((hi - lo, k + int(end)) for lo, hi, end in zip(bounds, bounds[1:], ends))
        return cls._build(mask, k, order, chunks)

    @classmethod
    def _build(cls, mask: Tensor, k: int, order: Tensor, chunks) -> "HistoryLayout":
        b, t = mask.shape
        dev = mask.device
        width = torch.tensor([w for n, w in chunks for _ in range(n)], device=dev)  # per sorted example
        n_tokens = sum(n * w for n, w in chunks)
        starts = torch.cumsum(width, 0) - width  # packed row of each sorted example's first token
        sorted_ex = torch.arange(b, device=dev).repeat_interleave(width, output_size=n_tokens)
        slot = torch.arange(n_tokens, device=dev) - starts[sorted_ex]  # 0..K-1 CLS, then history
        example = order[sorted_ex]
        is_hist = slot >= k
        hist_slot = (slot - k).clamp_min(0)
        # Kept history slots with the same trick (no boolean indexing: no device sync, no graph break).
        n_hist = sum(n * (w - k) for n, w in chunks)
        hist_ex = torch.arange(b, device=dev).repeat_interleave(width - k, output_size=n_hist)
        hist_starts = torch.cumsum(width - k, 0) - (width - k)
        hist_rows = order[hist_ex] * t + torch.arange(n_hist, device=dev) - hist_starts[hist_ex]
        hist_index = hist_starts[sorted_ex] + hist_slot  # packed history row, valid where is_hist
        rows = torch.where(is_hist, b * k + hist_index, example * k + slot.clamp_max(k - 1))
        real = is_hist & mask.flatten()[(example * t + hist_slot).clamp_max(b * t - 1)] if t else is_hist
        key_mask = ~is_hist | real
        events = mask.sum(1).clamp_min(1).to(torch.float32)
        pool_weight = real / events[example]
        cls_start = torch.empty(b, dtype=torch.long, device=dev)
        cls_start[order] = starts
        cls_rows = (cls_start[:, None] + torch.arange(k, device=dev)).flatten()
        return cls(hist_rows, rows, example, key_mask, tuple(chunks), cls_rows, pool_weight)

    @property
    def tokens_per_chunk(self) -> list[int]:
        return [n * width for n, width in self.chunks]

    def kept_history(self, x: Tensor) -> Tensor:
        """Per-slot history values [B, T, ...] -> the kept slots [N_h, ...]."""
        return x.flatten(0, 1)[self.hist_rows]

    def pack(self, cls_tokens: Tensor, history: Tensor) -> Tensor:
        """CLS tokens [B, K, d] and kept history tokens [N_h, d] -> packed tokens [N, d]."""
        return torch.cat([cls_tokens.flatten(0, 1), history]).index_select(0, self.rows)

    def per_token(self, x: Tensor) -> Tensor:
        """Per-example values [B, f] -> one row per packed token [N, f]."""
        return x.index_select(0, self.example)

    def cls_tokens(self, x: Tensor, k: int) -> Tensor:
        """Packed [N, d] -> the CLS tokens [B, K, d] in batch order."""
        return x.index_select(0, self.cls_rows).view(-1, k, x.shape[-1])

    def pool_events(self, x: Tensor, batch_size: int) -> Tensor:
        """Packed [N, d] -> mean over each example's real events [B, d] (zeros without any)."""
        weighted = x * self.pool_weight.to(x.dtype)[:, None]
        return x.new_zeros(batch_size, x.shape[-1]).index_add(0, self.example, weighted)
