"""Data-parallel plumbing: read torchrun's environment at run time, wrap the model in DDP, and
fail in bounded time, naming the rank, when another rank stops answering.

Nothing here runs at import. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets a
context with rank 0 of 1 and no process group, so the trainer has one code path.

Why the timeout: a rank that is frozen (SIGSTOP, a hung filesystem, a stuck kernel) does not
close its sockets, so the others wait in their next collective for the process group's
timeout, 30 minutes by default. loka sets it to ``timeout_s`` (300 s by default) and, when a
collective fails, asks a side gloo group's ``monitored_barrier`` which rank is missing.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_S = 300.0
MONITOR_TIMEOUT_S = 5.0  # the check for who stopped: the live ranks reach it together, within seconds
_COMM_FAILURE = re.compile(r"timed? ?out|timeout|connection|peer|gloo|nccl|socket", re.IGNORECASE)


class RankTimeoutError(RuntimeError):
    """A collective got no answer in time; the message names the rank(s) that stopped."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    monitor: object = field(default=None, repr=False, compare=False)  # gloo group for diagnosis

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            with self.watch():
                dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is True on any rank (a collective when data-parallel), so every rank
        stops at the same step on a signal or a time limit."""
        if self.world_size <= 1 or not dist.is_initialized():
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextmanager
    def watch(self):
        """Turn a collective's timeout or lost connection into `RankTimeoutError` naming the rank."""
        try:
            yield
        except RankTimeoutError:
            raise
        except RuntimeError as exc:
            if self.world_size <= 1 or self.monitor is None or not _COMM_FAILURE.search(str(exc)):
                raise
            raise RankTimeoutError(self._who_stopped(exc)) from exc

    def _who_stopped(self, exc: BaseException) -> str:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        try:
            dist.monitored_barrier(group=self.monitor, timeout=timedelta(seconds=min(self.timeout_s, MONITOR_TIMEOUT_S)),
                                   wait_all_ranks=True)
            who = "every rank answered a check afterwards (a lost connection, not a frozen rank)"
        except RuntimeError as check:
            who = _missing_ranks(str(check))
        return (f"{who} (seen from rank {self.rank}, whose collective failed: {first}); the collective "
                f"timeout is {self.timeout_s:g} s (dist_timeout_s, --dist-timeout).")


def _missing_ranks(message: str) -> str:
    """Name the ranks from monitored_barrier's message (rank 0 lists them; others blame rank 0)."""
    listed = re.search(r"Ranks? ([\d, ]+) failed to pass", message)
    if listed:
        return f"rank {listed.group(1).strip()} stopped answering"
    if re.search(r"from rank 0", message):
        return "rank 0 stopped answering"
    return f"the check could not tell which rank ({(message.splitlines() or [''])[0][:160]})"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's CUDA device if there is one, else CPU."""
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``timeout_s`` bounds every collective (a process group made by the caller keeps its own).
    """
    if not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s={timeout_s} must be a finite number of seconds > 0.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    monitor = None
    if world > 1:
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        # monitored_barrier exists on gloo only; a side group also survives the main one failing
        monitor = dist.new_group(backend="gloo", timeout=timedelta(seconds=min(timeout_s, MONITOR_TIMEOUT_S)))
    return DistContext(rank, world, local_rank, dev, timeout_s, monitor)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP-wrapped model when running data-parallel, else the model itself."""
    if ctx.world_size <= 1:
        return model

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    sparse = getattr(model, "sparse", None)
    if ctx.device.type == "cuda" and hasattr(sparse, "sparse_grad"):
        sparse.sparse_grad = False  # NCCL all-reduces dense gradients only (gloo takes sparse ones)
    return DistributedDataParallel(model, device_ids=ids)
