"""Sparse arch: every embedding table of the ranker fused into one, looked up once per step.

Production rankers spend most of their parameters here, and look their tables up as one fused
operation (FBGEMM's table-batched embedding, torchrec's EmbeddingBagCollection): the tables
are rows of one concatenated table, each feature's ids shifted by its table's first row, and
one `embedding_bag` call with per-bag offsets returns every embedding of the step:

- single-hot features: bags of one id;
- multi-hot features (e.g. a user's interest categories): bags of L ids weighted by
  1 / (valid ids), i.e. the mean over the valid ones (padding weighs 0);
- history events: bags of three ids, item (the item table, shared with the candidate as
  production rankers do) + action type + time-gap bucket, summed.

The gradient is sparse (only the rows a batch touched) and row-wise Adagrad
(`loka.models.optim`) keeps one accumulator per row and updates only those rows, so a step
costs in proportion to the batch, not to the table. The table can be stored in bf16
(``RankerConfig.embedding_dtype``); the optimizer state stays float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RankerConfig


def table_sizes(cfg: RankerConfig) -> tuple[int, ...]:
    """Rows of each fused table, in order: sparse features, multi-hot features, then (with a
    history) action types and time-gap buckets."""
    history = (cfg.n_actions, cfg.n_gap_buckets) if cfg.history_len else ()
    return tuple(cfg.sparse_cardinalities) + tuple(cfg.multi_hot_cardinalities) + history


class SparseArch(nn.Module):
    """Embeds single-hot ids, multi-hot bags and history events in one fused lookup.

    sparse [B, n_sparse] int64, multi_hot [B, n_multi_hot, L] int64, multi_hot_mask [B, n_multi_hot, L]
    bool, history (item, action, gap bucket ids, each [N_h] int64, or None)
    -> (context [B, n_sparse + n_multi_hot, D], events [N_h, D] or None).

    >>> arch = SparseArch(RankerConfig.from_size("tiny"))
    >>> ctx, _ = arch(torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 1, 4, dtype=torch.long),
    ...               torch.ones(3, 1, 4, dtype=torch.bool))
    >>> ctx.shape
    torch.Size([3, 9, 8])
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        sizes = table_sizes(cfg)
        dtype = torch.bfloat16 if cfg.embedding_dtype == "bfloat16" else torch.float32
        self.n_sparse, self.n_multi_hot = cfg.n_sparse, cfg.n_multi_hot
        self.n_feature_rows = sum(sizes[:cfg.n_sparse + cfg.n_multi_hot])
        self.item_table = cfg.history_item_feature
        self.table = nn.EmbeddingBag(sum(sizes), cfg.embed_dim, mode="sum", sparse=True, dtype=dtype)
        starts = torch.cumsum(torch.tensor((0,) + sizes), 0)
        self.register_buffer("row_offsets", starts[:-1].clone(), persistent=False)  # [n_tables]
        # Set by `loka.models.estimate` on fake tensors: the meta kernel of the sparse backward
        # cannot size a gradient whose row count depends on data, so its memory is modelled.
        self.estimated_grads: list | None = None
        # False: a dense gradient, for generic loops whose optimizer takes no sparse ones (Adam).
        self.sparse_grad = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Feature tables ~ N(0, 0.05²); action and gap tables ~ N(0, 1) (nn.Embedding's init)."""
        with torch.no_grad():
            w = self.table.weight
            nn.init.normal_(w[:self.n_feature_rows], std=0.05)
            nn.init.normal_(w[self.n_feature_rows:])

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The fused table (trained by row-wise Adagrad)."""
        return [self.table.weight]

    def forward(self, sparse: Tensor, multi_hot: Tensor, multi_hot_mask: Tensor,
                history: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        b, n_s, n_m = sparse.shape[0], self.n_sparse, self.n_multi_hot
        off, w = self.row_offsets, self.table.weight
        ids = [(sparse + off[:n_s]).flatten()]  # [B*n_s], bags of 1
        weights = [torch.ones(b * n_s, dtype=w.dtype, device=sparse.device)]
        starts = [torch.arange(b * n_s, device=sparse.device)]
        length = multi_hot.shape[-1] if n_m else 0
        if n_m:
            ids.append((multi_hot + off[n_s:n_s + n_m, None]).flatten())  # [B*n_m*L], bags of L
            valid = multi_hot_mask.to(w.dtype)
            weights.append((valid / valid.sum(-1, keepdim=True).clamp_min(1)).flatten())
            starts.append(b * n_s + length * torch.arange(b * n_m, device=sparse.device))
        n_events = 0
        if history is not None:
            item, action, gap = history
            n_events = item.shape[0]
            rows = torch.stack([item + off[self.item_table], action + off[n_s + n_m],
                                gap + off[n_s + n_m + 1]], 1)  # [N_h, 3], bags of 3
            ids.append(rows.flatten())
            weights.append(torch.ones(3 * n_events, dtype=w.dtype, device=sparse.device))
            starts.append(b * (n_s + n_m * length) + 3 * torch.arange(n_events, device=sparse.device))
        ids, starts, weights = torch.cat(ids), torch.cat(starts), torch.cat(weights)
        if self.estimated_grads is not None:
            out = _SparseGradEstimate.apply(w, ids, starts, weights, self.estimated_grads)
        else:
            out = _fused_lookup(ids, w, starts, weights, self.sparse_grad)  # [bags, D]
        single, multi, events = out.split([b * n_s, b * n_m, n_events])  # bags are example-major
        d = w.shape[1]
        context = torch.cat([single.view(b, n_s, d), multi.view(b, n_m, d)], dim=1)
        return context, (events if history is not None else None)


@torch.compiler.disable  # its sparse backward cannot be traced: runs eagerly between graphs
def _fused_lookup(ids: Tensor, weight: Tensor, starts: Tensor, weights: Tensor, sparse: bool) -> Tensor:
    """One `embedding_bag` over the fused table: ids [n], starts [bags], weights [n] -> [bags, D].
    Outside torch.compile, as production embedding lookups are: the sparse gradient's
    data-dependent size has no traced form (its meta kernel fails on it)."""
    return F.embedding_bag(ids, weight, starts, mode="sum", sparse=sparse, per_sample_weights=weights)


class _SparseGradEstimate(torch.autograd.Function):
    """The fused lookup whose backward allocates what its sparse gradient holds (one row of
    values and one index per looked-up id) and keeps it in ``holder`` instead of returning it."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, starts: Tensor, weights: Tensor, holder: list) -> Tensor:
        ctx.save_for_backward(ids, weights)
        ctx.holder, ctx.dim = holder, weight.shape[1]
        return F.embedding_bag(ids, weight, starts, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids, _ = ctx.saved_tensors
        ctx.holder.append((grad.new_empty(ids.shape[0], ctx.dim), ids.new_empty(1, ids.shape[0])))
        return None, None, None, None, None
