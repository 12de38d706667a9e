"""Data-parallel plumbing: read torchrun's environment at run time, wrap the model in DDP.

Nothing here runs at import. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets a
context with rank 0 of 1 and no process group, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's CUDA device if there is one, else CPU."""
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, dev)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP-wrapped model when running data-parallel, else the model itself."""
    if ctx.world_size <= 1:
        return model

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
