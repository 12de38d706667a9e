"""Which kernels torch.compile generated for a function: the proof that a cast was fused.

"The FP8 cast is fused into the previous op's epilogue" is a claim about inductor's
output, so loka checks it there instead of assuming it: compile ``fn``, run it once,
and read the kernels inductor wrote (``async_compile`` definitions in the output code;
on CPU ``cpp_fused_<ops>_<i>``, on CUDA ``triton_<kind>_fused_<ops>_<i>``, named after
the ATen ops they contain). A producer's cast is fused when quantizing its output adds
no kernel and the producer's kernel also holds the cast's amax.

``torch._inductor.metrics.generated_kernel_count`` is not used: on torch 2.13 CPU it
counts candidate kernels (7 for a fused rowwise cast that the output code holds in one).
"""

from __future__ import annotations

import re

import torch

_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.", re.M)


def generated_kernels(fn, *args, dynamic: bool | None = False) -> list[str]:
    """Names of the kernels inductor generates for ``fn(*args)`` (extern calls like matmuls excluded)."""
    try:
        from torch._inductor.utils import run_and_get_code  # optional: inductor, imported only when checking fusion
    except ImportError as exc:  # a torch build without inductor
        raise RuntimeError(f"torch.compile's inductor is not importable here ({exc}); fusion cannot be checked") from None
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(fn, dynamic=dynamic), *args)
    return [name for code in codes for name in _KERNEL_DEF.findall(code)]


def kernels_with(names: list[str], *ops: str) -> list[str]:
    """The kernels whose name holds every one of ``ops`` (e.g. ``"silu", "amax"``)."""
    return [n for n in names if all(op in n for op in ops)]
