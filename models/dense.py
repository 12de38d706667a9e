"""Dense arch: an MLP that turns heavy-tailed numeric features into a few embeddings.

Real dense features (counts, prices, dwell times) are log-normal or Student-t with outliers
many orders of magnitude out; a signed log1p first keeps one outlier from dominating the
GEMMs and their FP8 scales. The output joins the sparse embeddings in the interaction arch.
NaN/Inf inputs are replaced here (NaN -> 0, +-Inf -> +-1e30) so one bad value cannot poison a
batch; the trainer counts them and warns once per run, or stops (``nonfinite_dense``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import RankerConfig
from .layers import MLP, signed_log1p


class DenseArch(nn.Module):
    """dense [B, n_dense] float -> [B, n_dense_embeddings, D].

    >>> DenseArch(RankerConfig.from_size("tiny"))(torch.randn(3, 4)).shape
    torch.Size([3, 2, 8])
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.n_out, self.d = cfg.n_dense_embeddings, cfg.embed_dim
        self.mlp = MLP(cfg.n_dense, cfg.dense_hidden, d_out=self.n_out * self.d)

    def forward(self, dense: Tensor) -> Tensor:
        x = signed_log1p(torch.nan_to_num(dense, nan=0.0, posinf=1e30, neginf=-1e30))
        return self.mlp(x).view(-1, self.n_out, self.d)
