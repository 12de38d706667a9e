"""Sharded checkpoints of a sharded ranker with torch.distributed.checkpoint (DCP).

Every rank writes only what it holds: its shards of the TorchRec tables and of their fused
row-wise Adagrad state (ShardedTensors), its FSDP2 shards of the dense parameters and of the
dense optimizer's state (DTensors), plus the step. DCP stores each tensor by its global offsets,
so a checkpoint written by N ranks loads on M ranks (any table sharding, any FSDP2 mesh): each
rank reads the pieces that overlap what it now holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from .sharding import sparse_optimizer


def _state(model: nn.Module, dense_opt: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "sparse_optimizer": sparse_optimizer(model).state_dict(),
            "dense_optimizer": get_optimizer_state_dict(model, dense_opt), "step": torch.tensor(step)}


def save_sharded(path: str | Path, model: nn.Module, dense_opt: torch.optim.Optimizer, step: int) -> Path:
    """Write this rank's shards of model and optimizers (every rank calls it); returns ``path``."""
    dcp.save(_state(model, dense_opt, step), checkpoint_id=str(path))
    return Path(path)


def load_sharded(path: str | Path, model: nn.Module, dense_opt: torch.optim.Optimizer) -> int:
    """Load a checkpoint of `save_sharded` (written on any number of ranks) into this sharded
    model and its optimizers, in place; returns the step to continue from."""
    if not Path(path, ".metadata").is_file():
        raise ValueError(f"{path} is not a sharded checkpoint (no .metadata); give the directory "
                         "save_sharded wrote.")
    state = _state(model, dense_opt, 0)
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    sparse_optimizer(model).load_state_dict(state["sparse_optimizer"])
    set_optimizer_state_dict(model, dense_opt, state["dense_optimizer"])
    return int(state["step"])
