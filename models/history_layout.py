"""Where each token of the sequence arch lives: jagged (real tokens only) or padded (the reference).

Histories are short for most users and long for a few (log-normal lengths, capped at
``history_len``): at batch 8192 and a cap of 512 only about a quarter of the padded slots are
real events. `HistoryLayout.jagged` keeps, per example, its K summary (CLS) tokens followed by
its *real* events only, packed example after example into one ``[N, d]`` tensor with
``offsets [B + 1]``, so every per-token GEMM (``qkv``, ``attn_out``, ``ffn_*``) runs once, as
one named site, on exactly the real tokens: no compute on padding.

Attention needs each example's tokens together. On CUDA the jagged tokens go to SDPA as a
nested jagged tensor (`torch.nested`, layout ``torch.jagged``), which reaches the
variable-length flash kernel. On CPU the examples are sorted by length and cut into a few
chunks, each padded only to its own longest example (``chunk_rows``); only attention sees that
padding, and the result is gathered back (``token_pos``).

Dropping padded slots changes nothing a real token sees: padded keys are masked out of
attention and every other op is per token. `HistoryLayout.padded` keeps every slot (one chunk
in batch order, padded keys masked); it is the reference the jagged layout is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HistoryLayout:
    """Tokens of B examples, each K CLS tokens followed by its kept history slots, example-major.

    hist_rows [N_h]: the kept history slots, as rows of the flattened history ``[B * T]``.
    rows [N]: each token as a row of ``cat([cls [B * K], kept history [N_h]])``; tokens past
        ``offsets[-1]`` are spares of no example (jagged: N rounded up to a multiple of 16).
    example [N]: the example (batch index) each token belongs to.
    offsets [B + 1]: example i owns tokens ``offsets[i]:offsets[i + 1]`` (CLS first).
    key_mask [N] bool: the token is a CLS token or a real event (all True when jagged).
    pool_weight [N]: 1 / (events of the example) on real events, 0 elsewhere (masked mean).
    cls_rows [B * K]: rows of the CLS tokens, in batch order.
    chunks: (examples, padded tokens per example) of each CPU attention chunk.
    chunk_rows [P]: the token at each padded chunk position (token 0 where it is padding: never
        a key there, and a query whose output is dropped).
    chunk_keys [P] bool: the position holds a real key (a token that is CLS or a real event).
    token_pos [N]: each token's padded chunk position (None: the identity, nothing padded).
    max_len: an upper bound on tokens per example (K + T; read without a device sync).
    jagged: only real events are kept.
    attention: "auto" (NJT flash on CUDA, chunks on CPU) or "flash-estimate" (fake tensors: the
        memory and shapes of a variable-length flash kernel, no values; see `loka.models.estimate`).
    spare: tokens after ``offsets[-1]`` that belong to no example.
    nested_offsets [B + 2]: ``offsets`` and one more sequence, the spare tokens (possibly
        empty), so nested SDPA sees every token; a tensor, so no Python int that varies per
        batch reaches a compiled graph (jagged layouts only).
    """

    hist_rows: Tensor
    rows: Tensor
    example: Tensor
    offsets: Tensor
    key_mask: Tensor
    pool_weight: Tensor
    cls_rows: Tensor
    chunks: tuple[tuple[int, int], ...]
    chunk_rows: Tensor
    chunk_keys: Tensor
    token_pos: Tensor | None
    max_len: int
    jagged: bool
    attention: str = "auto"
    spare: int = 0
    nested_offsets: Tensor | None = None

    @classmethod
    def padded(cls, mask: Tensor, k: int) -> "HistoryLayout":
        """Every slot kept, one attention chunk in batch order. mask [B, T] bool (True = real)."""
        keep = torch.ones_like(mask)
        b, t = mask.shape
        order = torch.arange(b, device=mask.device)
        return cls._build(mask, keep, k, order, (b,), jagged=False)

    @classmethod
    def jagged_tokens(cls, mask: Tensor, k: int, max_chunks: int = 8, min_chunk: int = 64,
                      attention: str = "auto", pad_to: int = 16) -> "HistoryLayout":
        """Only real events kept; CPU attention chunks of at least ``min_chunk`` examples sorted by
        length, at most ``max_chunks`` of them; the token count rounded up to a multiple of
        ``pad_to`` with spare tokens of no example. mask [B, T] bool. Sizes are read on the host
        (one device sync on a GPU: build it outside a timed step, see `Ranker.history_layout`)."""
        if max_chunks < 1 or min_chunk < 1 or pad_to < 1:
            raise ValueError("HistoryLayout.jagged_tokens needs max_chunks, min_chunk and pad_to >= 1.")
        if attention not in ("auto", "flash-estimate"):
            raise ValueError(f"attention must be 'auto' or 'flash-estimate', got {attention!r}.")
        b = mask.shape[0]
        order = mask.sum(1).sort(stable=True).indices
        n_chunks = max(1, min(max_chunks, b // min_chunk))
        bounds = [round(b * i / n_chunks) for i in range(n_chunks + 1)]
        sizes = tuple(hi - lo for lo, hi in zip(bounds, bounds[1:]))
        return cls._build(mask, mask, k, order, sizes, jagged=True, attention=attention, pad_to=pad_to)

    @classmethod
    def _build(cls, mask: Tensor, keep: Tensor, k: int, order: Tensor, sizes: tuple[int, ...],
               jagged: bool, attention: str = "auto", pad_to: int = 1) -> "HistoryLayout":
        b, t = mask.shape
        dev = mask.device
        n_keep = keep.sum(1)  # [B]
        width = k + n_keep
        offsets = torch.cat([width.new_zeros(1), torch.cumsum(width, 0)])
        # The host reads of a data-dependent size (none for the padded layout).
        n_tokens = int(offsets[-1]) if jagged else b * (k + t)
        n_hist = n_tokens - b * k
        example = torch.arange(b, device=dev).repeat_interleave(width, output_size=n_tokens)
        slot = torch.arange(n_tokens, device=dev) - offsets[example]  # 0..K-1 CLS, then history
        is_hist = slot >= k
        hist_start = offsets[:-1] - k * torch.arange(b, device=dev)  # first kept slot of each example
        # Kept slots in example-major order without boolean indexing (no sync, no graph break).
        rank = torch.cumsum(keep.long(), 1) - 1
        target = torch.where(keep, hist_start[:, None] + rank, n_hist).flatten()
        hist_rows = torch.zeros(n_hist + 1, dtype=torch.long, device=dev).scatter_(
            0, target, torch.arange(b * t, device=dev))[:n_hist]
        hist_index = (hist_start[example] + slot - k).clamp(0, max(n_hist - 1, 0))
        rows = torch.where(is_hist, b * k + hist_index, example * k + slot.clamp_max(k - 1))
        real = is_hist & mask.flatten()[hist_rows[hist_index]] if n_hist else is_hist
        events = mask.sum(1).clamp_min(1).to(torch.float32)
        cls_rows = (offsets[:-1, None] + torch.arange(k, device=dev)).flatten()
        key_mask, pool_weight = ~is_hist | real, real / events[example]
        if not jagged:  # one chunk in batch order, nothing padded
            return cls(hist_rows, rows, example, offsets, key_mask, pool_weight, cls_rows,
                       ((b, k + t),), torch.arange(n_tokens, device=dev), key_mask, None, k + t, jagged,
                       attention)
        chunks, chunk_rows, token_pos = _attention_chunks(width, order, sizes, example, slot)
        # Up to pad_to - 1 spare tokens after the last example, so that every per-token GEMM has
        # M (and wgrad K) a multiple of pad_to, as FP8 GEMMs need; they belong to no example.
        spare = (-n_tokens) % pad_to
        padding = chunk_rows == n_tokens
        chunk_keys = ~padding & key_mask[chunk_rows.clamp_max(n_tokens - 1)]
        chunk_rows = chunk_rows.masked_fill(padding, 0)
        zeros = torch.zeros(spare, dtype=torch.long, device=dev)
        return cls(hist_rows, torch.cat([rows, zeros]), torch.cat([example, zeros]), offsets,
                   torch.cat([key_mask, zeros.bool()]), torch.cat([pool_weight, zeros.float()]),
                   cls_rows, chunks, chunk_rows, chunk_keys, torch.cat([token_pos, zeros]), k + t, jagged, attention,
                   spare, torch.cat([offsets, offsets[-1:] + spare]))

    @property
    def n_tokens(self) -> int:
        """Tokens every per-token op runs on, spares included."""
        return len(self.rows)

    @property
    def tokens_per_chunk(self) -> list[int]:
        return [n * width for n, width in self.chunks]

    def kept_history(self, x: Tensor) -> Tensor:
        """Per-slot history values [B, T, ...] -> the kept slots [N_h, ...]."""
        return x.flatten(0, 1)[self.hist_rows]

    def pack(self, cls_tokens: Tensor, history: Tensor) -> Tensor:
        """CLS tokens [B, K, d] and kept history tokens [N_h, d] -> tokens [N, d]."""
        return torch.cat([cls_tokens.flatten(0, 1), history]).index_select(0, self.rows)

    def per_token(self, x: Tensor) -> Tensor:
        """Per-example values [B, f] -> one row per token [N, f]."""
        return x.index_select(0, self.example)

    def cls_tokens(self, x: Tensor, k: int) -> Tensor:
        """Tokens [N, d] -> the CLS tokens [B, K, d] in batch order."""
        return x.index_select(0, self.cls_rows).view(-1, k, x.shape[-1])

    def pool_events(self, x: Tensor, batch_size: int) -> Tensor:
        """Tokens [N, d] -> mean over each example's real events [B, d] (zeros without any)."""
        weighted = x * self.pool_weight.to(x.dtype)[:, None]
        return x.new_zeros(batch_size, x.shape[-1]).index_add(0, self.example, weighted)

    def to_chunks(self, x: Tensor) -> Tensor:
        """Tokens [N, f] -> padded chunk positions [P, f] (padding holds some token's values)."""
        if self.token_pos is None:
            return x
        return x.index_select(0, self.chunk_rows)

    def from_chunks(self, x: Tensor) -> Tensor:
        """Padded chunk positions [P, f] -> tokens [N, f]."""
        return x if self.token_pos is None else x.index_select(0, self.token_pos)


def _attention_chunks(width: Tensor, order: Tensor, sizes: tuple[int, ...], example: Tensor,
                      slot: Tensor):
    """Chunks of examples in ``order`` (``sizes`` examples each), each padded to its widest one."""
    sorted_width = width[order]
    bounds = torch.cumsum(torch.tensor((0,) + sizes), 0)
    chunk_width = [int(sorted_width[lo:hi].max()) if hi > lo else 0
                   for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    chunks = tuple((n, w) for n, w in zip(sizes, chunk_width) if n)
    per_example = torch.tensor([w for n, w in chunks for _ in range(n)], device=width.device)
    start_sorted = torch.cumsum(per_example, 0) - per_example  # padded start of each sorted example
    start = torch.empty_like(start_sorted)
    start[order] = start_sorted
    token_pos = start[example] + slot
    n_pos = int(per_example.sum())
    chunk_rows = torch.full((n_pos,), len(example), dtype=torch.long, device=width.device)
    chunk_rows[token_pos] = torch.arange(len(example), device=width.device)
    return chunks, chunk_rows, token_pos
