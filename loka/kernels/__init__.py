"""loka.kernels (core): the GEMM kernels every layer above runs, and their speed model.

A *kernel* is one executable implementation of a recipe on a backend. This package
holds the ``GemmKernel`` protocol, the typed registry ``KERNELS`` with the built-in
backends registered (``bf16``, ``emulated`` — the reference every kernel is tested
against —, ``scaled_mm``, ``torchao``, ``te``, ``triton``), the Triton kernels, and
``costmodel``, the speed model of a GPU that stands in for measuring where none is at
hand. ``Float8Linear`` (``loka.nn``) runs its three GEMMs through these kernels; the
planner (``loka.dispatch``) chooses among them. Optional libraries are imported lazily
and a missing one is reported by name through ``available()``.
"""

from loka.kernels.kernel import KERNELS, GemmKernel, KernelRegistry, Quantized, Support
from loka.kernels import registry as _registry  # noqa: F401  (registers the built-in kernels)


def get_kernel(name: str) -> GemmKernel:
    """The registered kernel called ``name`` (e.g. ``"scaled_mm"``)."""
    return KERNELS.get(name)


__all__ = ["KERNELS", "GemmKernel", "KernelRegistry", "Quantized", "Support", "get_kernel"]
