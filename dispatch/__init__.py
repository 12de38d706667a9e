"""loka.dispatch: choose and run the fastest FP8 kernel per site and GEMM.

The kernel interface and registry (``GemmKernel``, ``KERNELS``), the built-in
backends, and (in later modules) micro-benchmarks and the budgeted plan.
"""

from loka.dispatch.kernel import KERNELS, GemmKernel, KernelRegistry, Quantized, Support
from loka.dispatch import registry as _registry  # noqa: F401  (registers built-in kernels)


def get_kernel(name: str) -> GemmKernel:
    """The registered kernel called ``name`` (e.g. ``"scaled_mm"``)."""
    return KERNELS.get(name)


__all__ = ["KERNELS", "GemmKernel", "KernelRegistry", "Quantized", "Support", "get_kernel"]
