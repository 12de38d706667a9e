"""Optimizers for the ranker: AdamW for dense parameters, row-wise Adagrad for embeddings.

Embedding tables hold most parameters but each step touches few rows. Row-wise Adagrad
(the FBGEMM/torchrec default for recommendation tables) keeps ONE accumulator per row
instead of one per element (D times less optimizer memory than Adam) and updates only the
rows present in a sparse gradient; with a dense gradient the untouched rows get a zero
update, so both layouts give the same result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RowWiseAdagrad(torch.optim.Optimizer):
    """For each row r of a 2-D parameter with gradient g_r:

        state_r += mean(g_r²);  w_r -= lr * g_r / (sqrt(state_r) + eps)

    Accepts dense or sparse (COO) gradients. ``state["sum"]`` has shape [rows].
    """

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8, initial_accumulator: float = 0.0):
        if lr <= 0 or eps <= 0:
            raise ValueError("RowWiseAdagrad needs lr > 0 and eps > 0.")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator": initial_accumulator})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError("RowWiseAdagrad updates 2-D embedding tables only; "
                                     "give other parameters to AdamW.")
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator"],
                                              dtype=torch.float32, device=p.device)
                if p.grad.is_sparse:
                    self._sparse_update(p, p.grad.coalesce(), state["sum"], group)
                else:
                    self._dense_update(p, p.grad, state["sum"], group)
        return loss

    @staticmethod
    def _dense_update(p: Tensor, grad: Tensor, acc: Tensor, group: dict) -> None:
        g = grad.float()
        acc.add_(g.pow(2).mean(1))
        step = g / (acc.sqrt() + group["eps"]).unsqueeze(1)
        p.sub_((group["lr"] * step).to(p.dtype))

    @staticmethod
    def _sparse_update(p: Tensor, grad: Tensor, acc: Tensor, group: dict) -> None:
        rows, g = grad.indices()[0], grad.values().float()  # [R], [R, D] (rows unique)
        acc.index_add_(0, rows, g.pow(2).mean(1))
        step = g / (acc[rows].sqrt() + group["eps"]).unsqueeze(1)
        p.index_add_(0, rows, (-group["lr"] * step).to(p.dtype))


def build_optimizers(model: nn.Module, lr_dense: float, lr_sparse: float,
                     weight_decay: float) -> dict[str, torch.optim.Optimizer]:
    """{"dense": AdamW over non-embedding params, "sparse": RowWiseAdagrad over tables}.

    ``model`` must provide ``embedding_parameters()`` and ``dense_parameters()`` (see Ranker).
    """
    inner = getattr(model, "module", model)  # unwrap DDP
    decay = [p for p in inner.dense_parameters() if p.dim() >= 2]
    no_decay = [p for p in inner.dense_parameters() if p.dim() < 2]
    # The fused kernel updates every tensor in one pass (about 4x cheaper than foreach on CPU).
    fused = {"fused": True} if _fused_adamw_ok(decay + no_decay) else {"foreach": True}
    dense = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr_dense, **fused)
    sparse = RowWiseAdagrad(inner.embedding_parameters(), lr=lr_sparse)
    return {"dense": dense, "sparse": sparse}


def _fused_adamw_ok(params: list[Tensor]) -> bool:
    """The fused AdamW kernel takes plain floating-point tensors on CPU or CUDA, all on one device."""
    devices = {p.device.type for p in params}
    plain = all(type(p.data) is Tensor and p.is_floating_point() for p in params)
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and plain
