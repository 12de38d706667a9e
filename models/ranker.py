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
from .history_layout import HistoryLayout
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

    def forward(self, batch: Batch, layout: HistoryLayout | None = None) -> dict[str, Tensor]:
        """Logits per task. ``layout``: the history's `HistoryLayout` when built outside the step
        (`history_layout`: its sizes are read on the host, a device sync on GPUs)."""
        history = None
        if self.sequence is not None:
            layout = self.history_layout(batch) if layout is None else layout
            history = self.sequence.event_ids(layout, batch.hist_items, batch.hist_actions, batch.hist_gaps)
        embedded, events = self.sparse(batch.sparse, batch.multi_hot, batch.multi_hot_mask, history)
        context = torch.cat([embedded, self.dense(batch.dense).to(embedded.dtype)], dim=1)  # [B, n_ctx, D]
        parts = [context]
        if self.sequence is not None:
            parts.append(self.sequence(events, context, layout).to(context.dtype))
        x = torch.cat(parts, dim=1)  # [B, n_embeddings, D]
        logits = self.over(self.interaction(x))
        return {task: v.float() for task, v in logits.items()}

    def history_layout(self, batch: Batch) -> HistoryLayout | None:
        """The tokens of the batch's history (None without a sequence arch); see `HistoryLayout`."""
        return None if self.sequence is None else self.sequence.layout(batch.hist_mask)

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, Tensor]:
        """Probabilities {task: [B]} in eval mode semantics (no grad)."""
        return {task: torch.sigmoid(v) for task, v in self(batch).items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of the embedding tables (trained by row-wise Adagrad)."""
        return self.sparse.embedding_parameters()

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (trained by AdamW)."""
        ids = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]
