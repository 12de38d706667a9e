"""The reference ads ranker: sparse + dense + sequence arches -> Wukong interaction -> heads.

    sparse ids ──SparseArch──┐
    multi-hot  ──(pooled)────┤
    dense      ──DenseArch───┼─ context [B, n_ctx, D] ─┐
    history    ──SequenceArch(personalized by context)─┴─ [B, n, D] ─InteractionArch─ OverArch ─ {task: logits}

Every weight GEMM is an `nn.Linear` with a stable fqn (e.g. ``interaction.layers.1.fmb.mlp.out``)
and the FM's activation product is the `BatchMatmul` site ``interaction.layers.i.fmb.fm.bmm``,
so `loka.probe` sees and `loka.convert` swaps each one by name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .batch import Batch
from .config import RankerConfig
from .dense import DenseArch
from .interaction import InteractionArch
from .over import OverArch
from .sequence import SequenceArch
from .sparse import SparseArch


class Ranker(nn.Module):
    """Multi-task ads ranker. forward(batch) -> {task: logits [B]} for task in cfg.tasks.

    >>> from loka.models.synthetic import SyntheticStream
    >>> cfg = RankerConfig.from_size("tiny")
    >>> batch = SyntheticStream(cfg, batch_size=4).batch(0)
    >>> {k: v.shape for k, v in Ranker(cfg)(batch).items()}
    {'ctr': torch.Size([4]), 'cvr': torch.Size([4])}
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.sparse = SparseArch(cfg)
        self.dense = DenseArch(cfg)
        n_context = cfg.n_sparse + cfg.n_multi_hot + cfg.n_dense_embeddings
        self.sequence = SequenceArch(cfg, n_context) if cfg.history_len else None
        self.interaction = InteractionArch(cfg)
        self.over = OverArch(cfg, self.interaction.n_out)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        context = torch.cat([
            self.sparse(batch.sparse, batch.multi_hot, batch.multi_hot_mask),
            self.dense(batch.dense).to(self._embedding_dtype()),
        ], dim=1)  # [B, n_ctx, D]
        parts = [context]
        if self.sequence is not None:
            parts.append(self.sequence(batch.hist_items, batch.hist_actions, batch.hist_gaps,
                                       batch.hist_mask, context, self.sparse.embed_items).to(context.dtype))
        x = torch.cat(parts, dim=1)  # [B, n_embeddings, D]
        logits = self.over(self.interaction(x))
        return {task: v.float() for task, v in logits.items()}

    def _embedding_dtype(self) -> torch.dtype:
        return self.sparse.tables[0].weight.dtype

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, Tensor]:
        """Probabilities {task: [B]} in eval mode semantics (no grad)."""
        return {task: torch.sigmoid(v) for task, v in self(batch).items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of the embedding tables (trained by row-wise Adagrad)."""
        tables = list(self.sparse.tables) + list(self.sparse.bags)
        if self.sequence is not None:
            tables += [self.sequence.action_emb, self.sequence.gap_emb]
        return [t.weight for t in tables]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (trained by AdamW)."""
        ids = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]
