"""The batch every part of the ranker speaks: features, history, labels, and ground truth.

One dataclass travels from the data sources (synthetic stream, Criteo loader, serving
requests) through the model, the trainer and the evaluator, so each of them checks shapes
once, here, instead of passing loose tensors around.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import RankerConfig


@dataclass
class Batch:
    """B examples.

    dense:        [B, n_dense] float32, raw (heavy-tailed) values.
    sparse:       [B, n_sparse] int64, each id in [0, cardinality).
    multi_hot:    [B, n_multi_hot, L] int64 ids; multi_hot_mask [B, n_multi_hot, L] bool (True = id).
    hist_items:   [B, T] int64 item ids; hist_actions [B, T] int64; hist_gaps [B, T] float32 days
                  before the request; hist_mask [B, T] bool (True = real event, False = padding).
    labels:       [B, n_tasks] float32 in {0, 1}; label_weights [B, n_tasks] float32 (0 = the task
                  does not apply, e.g. CVR on an unclicked impression).
    true_probs:   [B, n_tasks] float32 teacher probabilities (synthetic data only) or None.
    example_ids:  [B] int64, unique within a stream, so two models can be compared per example.
    """

    dense: Tensor
    sparse: Tensor
    multi_hot: Tensor
    multi_hot_mask: Tensor
    hist_items: Tensor
    hist_actions: Tensor
    hist_gaps: Tensor
    hist_mask: Tensor
    labels: Tensor | None = None
    label_weights: Tensor | None = None
    true_probs: Tensor | None = None
    example_ids: Tensor | None = None

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def _map(self, fn) -> "Batch":
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = None if value is None else fn(value)
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def slice(self, start: int, stop: int) -> "Batch":
        """Examples [start, stop) as a new Batch (views, no copy)."""
        return self._map(lambda t: t[start:stop])

    @staticmethod
    def cat(batches: list["Batch"]) -> "Batch":
        """Concatenate along the example dim; all batches must share T and L."""
        if not batches:
            raise ValueError("Batch.cat needs at least one batch.")
        out = {}
        for f in dataclasses.fields(Batch):
            values = [getattr(b, f.name) for b in batches]
            if any(v is None for v in values):
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values, dim=0)
        return Batch(**out)

    @staticmethod
    def empty_history(batch_size: int, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """History tensors for sources without histories (T = 0)."""
        z = torch.zeros(batch_size, 0, dtype=torch.int64, device=device)
        return z, z.clone(), z.float(), z.bool()


def example_batch(cfg: "RankerConfig", n: int) -> Batch:
    """A valid all-zero batch of n examples (warm-up, compile)."""
    t, m, l = cfg.history_len, cfg.n_multi_hot, cfg.multi_hot_len
    return Batch(torch.zeros(n, cfg.n_dense), torch.zeros(n, cfg.n_sparse, dtype=torch.int64),
                 torch.zeros(n, m, l, dtype=torch.int64), torch.zeros(n, m, l, dtype=torch.bool),
                 torch.zeros(n, t, dtype=torch.int64), torch.zeros(n, t, dtype=torch.int64),
                 torch.zeros(n, t), torch.zeros(n, t, dtype=torch.bool))
