"""Sparse arch: one embedding table per categorical feature, pooled tables for multi-hot ones.

Production rankers spend most of their parameters here; each feature has its own table sized
by its cardinality. Multi-hot features (e.g. a user's interest categories) are pooled with
`nn.EmbeddingBag` (mean over the valid ids). The tables are trained by row-wise Adagrad
(`loka.models.optim`), not AdamW, since only a few rows are touched per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import RankerConfig


class SparseArch(nn.Module):
    """Embeds single-hot and multi-hot ids.

    sparse [B, n_sparse] int64, multi_hot [B, n_multi_hot, L] int64, multi_hot_mask [B, n_multi_hot, L]
    -> [B, n_sparse + n_multi_hot, D].

    >>> arch = SparseArch(RankerConfig.from_size("tiny"))
    >>> arch(torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 1, 4, dtype=torch.long),
    ...      torch.ones(3, 1, 4, dtype=torch.bool)).shape
    torch.Size([3, 9, 8])
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.tables = nn.ModuleList(nn.Embedding(card, d) for card in cfg.sparse_cardinalities)
        # Row 0 is padding so masked ids drop out of the mean.
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(card + 1, d, mode="mean", padding_idx=0)
            for card in cfg.multi_hot_cardinalities)
        self.history_item_feature = cfg.history_item_feature
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in list(self.tables) + list(self.bags):
            nn.init.normal_(table.weight, std=0.05)
        for bag in self.bags:
            with torch.no_grad():
                bag.weight[0].zero_()

    def forward(self, sparse: Tensor, multi_hot: Tensor, multi_hot_mask: Tensor) -> Tensor:
        out = [table(sparse[:, i]) for i, table in enumerate(self.tables)]
        for j, bag in enumerate(self.bags):
            ids = torch.where(multi_hot_mask[:, j], multi_hot[:, j] + 1, 0)
            out.append(bag(ids))
        return torch.stack(out, dim=1)

    def embed_items(self, item_ids: Tensor) -> Tensor:
        """History item ids [...] -> [..., D] through the shared item table."""
        return self.tables[self.history_item_feature](item_ids)
