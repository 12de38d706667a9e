"""The bundled ranker as a probe workload: ``loka probe --model small`` and ``loka mods show``.

The probe trains whatever :class:`loka.probe.workload.Workload` it is given and knows no
model; the command line (``loka.app.cli``) offers the ranker's sizes by name through
:data:`RANKER_WORKLOADS`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from loka.probe.workload import Workload

from .config import SIZES, RankerConfig
from .ranker import Ranker
from .synthetic import SyntheticStream
from .train import task_losses, total_loss


def ranker_workload(size: str, *, batch_size: int = 256, seed: int = 0, device: str = "cpu") -> Workload:
    """The bundled ranker of ``size`` on its synthetic stream (loss: the training loss, task-weighted)."""
    cfg = RankerConfig.from_size(size)
    torch.manual_seed(seed)
    model = Ranker(cfg).to(device)
    model.sparse.sparse_grad = False  # the loops that train a workload use torch.optim.Adam (dense only)
    stream = SyntheticStream(cfg, batch_size=batch_size, seed=seed, device=device)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return total_loss(task_losses(m(batch), batch))

    return Workload(model, stream.batch, loss_fn, name=f"ranker-{size}")


# size -> factory(batch_size=, seed=, device=), the names ``loka probe --model`` accepts.
RANKER_WORKLOADS = {size: functools.partial(ranker_workload, size) for size in SIZES}
