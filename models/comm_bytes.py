"""Bytes each rank hands to each collective, counted at the process-group call.

Every collective of torch.distributed (the ones FSDP2, DDP and torchrec's sharded modules issue,
forward and backward) reaches the dispatcher as a ``c10d`` op; `CommBytes` is a dispatch mode
that sums, per op, the bytes of the tensors this rank sends (the input buffer: for all-gather
its shard, for all-to-all everything it scatters, for all-reduce the tensor), so a report of
"bytes per step per collective" is measured, not estimated from shapes.

    >>> with CommBytes() as comms:
    ...     pass  # a training step
    >>> comms.per_step(1)
    {}
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# c10d op name -> index of the argument holding what this rank sends (the rest is its output)
_SENT_ARG = {"alltoall_base_": 1, "_allgather_base_": 1, "_reduce_scatter_base_": 1, "allgather_into_tensor_coalesced_": 1,
             "reduce_scatter_tensor_coalesced_": 1, "allreduce_": 0, "allreduce_coalesced_": 0, "broadcast_": 0,
             "allgather_": 1, "reduce_scatter_": 1, "alltoall_": 1}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommBytes(TorchDispatchMode):
    """Counts calls and sent bytes per collective (``calls`` and ``sent`` are {op: int})."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.sent: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, rest = func.name().partition("::")
        if namespace == "c10d":
            op = rest.split(".")[0]
            self.calls[op] += 1
            index = _SENT_ARG.get(op)
            self.sent[op] += _nbytes(args[index]) if index is not None and index < len(args) else 0
        return func(*args, **(kwargs or {}))

    def per_step(self, steps: int) -> dict[str, float]:
        """{collective: bytes sent per step} over ``steps`` steps."""
        return {op: self.sent[op] / max(steps, 1) for op in sorted(self.sent)}
