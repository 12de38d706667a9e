"""Over arch: a shared MLP trunk and one logit head per task (CTR, CVR, ...), trained jointly.

Sharing the trunk is what multi-task rankers do to let the sparse CVR signal borrow from the
abundant CTR one; each head is a single Linear so its site is visible by name (``heads.ctr``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import RankerConfig
from .layers import MLP


class OverArch(nn.Module):
    """x [B, n, D] -> {task: logits [B]}.

    >>> cfg = RankerConfig.from_size("tiny")
    >>> sorted(OverArch(cfg, 8)(torch.randn(3, 8, 8)))
    ['ctr', 'cvr']
    """

    def __init__(self, cfg: RankerConfig, n_in: int) -> None:
        super().__init__()
        self.trunk = MLP(n_in * cfg.embed_dim, cfg.over_hidden)
        self.heads = nn.ModuleDict({task: nn.Linear(self.trunk.d_out, 1) for task in cfg.tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x.flatten(1))
        return {task: head(h).squeeze(-1) for task, head in self.heads.items()}

    def init_bias(self, base_rates: dict[str, float]) -> None:
        """Start each head at its base rate's logit so early steps do not fight the prior."""
        with torch.no_grad():
            for task, rate in base_rates.items():
                rate = min(max(rate, 1e-6), 1 - 1e-6)
                self.heads[task].bias.fill_(float(torch.logit(torch.tensor(rate))))
