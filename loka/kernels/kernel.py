"""The GEMM kernel interface every backend implements, and its typed registry.

A *kernel* is one executable implementation of FP8 (or hp) GEMMs on a backend.
All kernels compute the same thing, ``out[M, N] = a[M, K] · b[N, K]ᵀ`` with both
operands reduction-last (see loka/recipe.py for how fprop, dgrad and wgrad map
onto it), and differ in which recipes and shapes they take and how fast they
are. ``emulated`` is the reference every other kernel is tested against.

Backends are probed lazily: ``available()`` imports libraries and checks the
device only when asked, and says why not by name (``te: not installed``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from loka.recipe import GEMMS, GemmRecipe

Shape = tuple[int, int, int]  # (M, K, N) of out[M,N] = a[M,K] · b[N,K]ᵀ


@dataclass(frozen=True)
class Support:
    """Answer of ``available()`` / ``supports()``: ``ok`` and, when not, why."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __iter__(self):  # allows ``ok, reason = kernel.supports(...)``
        return iter((self.ok, self.reason))


YES = Support(True)


def no(reason: str) -> Support:
    return Support(False, reason)


@dataclass(frozen=True)
class Quantized:
    """An operand already cast to FP8 (e.g. a weight cached for serving)."""

    data: torch.Tensor  # [rows, K] fp8, row-major
    scale: torch.Tensor  # dequant scale, shaped as loka.quantize returns it


class GemmKernel(ABC):
    """One implementation of ``out = a · bᵀ`` for some recipes, shapes and devices."""

    name: ClassVar[str]
    backend: ClassVar[str]
    gemms: ClassVar[frozenset[str]] = frozenset(GEMMS)
    hp: ClassVar[bool] = False  # True for kernels that do not quantize
    # Whether the FP8 cast is loka.quantize's bit for bit (then tests compare tightly to
    # ``emulated``; otherwise by SQNR).
    exact_quantization: ClassVar[bool] = True
    # "skip": amax ignores NaN/Inf like loka.quantize; "poison": a NaN/Inf in a scale group
    # makes that group's output non-finite (never hides it).
    nonfinite_amax: ClassVar[str] = "skip"
    # True when the code path was written without the hardware to run it (reported by doctor).
    untested: ClassVar[bool] = False
    # Whether ``mm`` takes a pre-quantized ``b`` (a cached FP8 weight, loka/weight_cache.py).
    takes_quantized_b: ClassVar[bool] = True
    # Whether ``mm`` takes a pre-quantized ``a`` (an activation its producer quantized, e.g. the
    # fused norm+quantize of loka.mods.fused_norm_quant); then ``out_dtype`` must be given.
    takes_quantized_a: ClassVar[bool] = False
    # Why the planner, the probe and the micro-benchmarks leave this kernel out unless it is
    # named explicitly (``kernels=[...]``); empty: it is a default candidate.
    not_default: ClassVar[str] = ""
    # --- capabilities the probe, the speed model, the planner and the mods read (never the name) ---
    # The numerical reference (quantize -> dequantize -> hp matmul): timed and tested, never planned.
    reference: ClassVar[bool] = False
    # Quantizes ``a`` inside the GEMM (reads it in hp): the speed model prices that fused cast, and
    # no producer can hand it an FP8 ``a``.
    fuses_a_cast: ClassVar[bool] = False
    # Priced by the speed model when a site has no representative timing (one kernel per cost class:
    # a GEMM after separate casts, a GEMM with the fused ``a`` cast).
    modelled: ClassVar[bool] = False
    # Rank in ``Float8Linear(kernels="auto")``: the lowest available one that takes the recipe wins;
    # None: never chosen by "auto".
    auto_rank: ClassVar[int | None] = None
    # Runs ``torch._scaled_mm`` on its FP8 operands as they are (a mod may call it with its own scales).
    torch_scaled_mm: ClassVar[bool] = False
    # GPU architectures (loka/devices.py) whose recipes it runs natively; ``emulated`` runs anywhere.
    archs: ClassVar[frozenset[str]] = frozenset()
    # The unpadded kernel this one wraps (loka/kernels/padded.py): None when it pads nothing.
    inner: "GemmKernel | None" = None

    def library_version(self) -> str:
        """Version of the library behind this kernel (part of benchmark cache keys)."""
        return torch.__version__

    def available(self, device: torch.device | str | None = None) -> Support:
        """Whether this kernel can run on ``device`` here (library present, capability)."""
        return YES

    @abstractmethod
    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device: torch.device | str) -> Support:
        """Whether this kernel computes ``recipe`` at ``shape`` for inputs of ``dtype`` on ``device``."""

    @abstractmethod
    def mm(
        self,
        a: torch.Tensor | Quantized,
        b: torch.Tensor | Quantized,
        recipe: GemmRecipe,
        *,
        scale_a: torch.Tensor | None = None,
        scale_b: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``a[M,K] · b[N,K]ᵀ -> [M,N]``. ``scale_a``/``scale_b`` are precomputed (delayed or
        static) dequant scales; None means dynamic. ``b`` may be pre-quantized, and ``a`` too
        where ``takes_quantized_a``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.backend})>"


NVIDIA_FP8_ARCHS = frozenset({"sm89", "sm90", "sm100"})  # loka/devices.py names
OCP_FP8 = ("e4m3", "e5m2")  # the encodings NVIDIA GPUs (and MI350) multiply; MI300's are the fnuz ones


def formats_problem(recipe: GemmRecipe, allowed: tuple[str, ...], who: str) -> str | None:
    """Why ``who`` cannot take the element formats of ``recipe``'s operands (None if it can)."""
    bad = [op.format for op in (recipe.a, recipe.b) if not op.is_hp and op.format not in allowed]
    if bad:
        return f"{who} takes {'/'.join(allowed)} elements, not {'/'.join(dict.fromkeys(bad))}"
    return None


def quantized_out_dtype(a: torch.Tensor | Quantized) -> torch.dtype:
    """``mm``'s default output dtype: ``a``'s; a pre-quantized ``a`` has none to give."""
    if isinstance(a, Quantized):
        raise ValueError("a pre-quantized a has no high-precision dtype: pass out_dtype")
    return a.dtype


def check_operands(a: torch.Tensor | Quantized, b: torch.Tensor | Quantized) -> Shape:
    """Validate 2-D operands with matching reduction dims; returns (M, K, N)."""
    a = a.data if isinstance(a, Quantized) else a
    b_data = b.data if isinstance(b, Quantized) else b
    if a.dim() != 2 or b_data.dim() != 2:
        raise ValueError(f"GEMM operands must be 2-D, got a{tuple(a.shape)} and b{tuple(b_data.shape)}")
    if a.shape[1] != b_data.shape[1]:
        raise ValueError(
            f"reduction dims differ: a is [M={a.shape[0]}, K={a.shape[1]}], b is [N={b_data.shape[0]}, K={b_data.shape[1]}]"
        )
    return a.shape[0], a.shape[1], b_data.shape[0]


class KernelRegistry:
    """Name -> kernel, for every backend loka knows (available here or not)."""

    def __init__(self) -> None:
        self._kernels: dict[str, GemmKernel] = {}

    def register(self, kernel: GemmKernel) -> GemmKernel:
        if not isinstance(kernel, GemmKernel):
            raise TypeError(f"register needs a GemmKernel instance, got {type(kernel).__name__}")
        if kernel.name in self._kernels:
            raise ValueError(f"a kernel named {kernel.name!r} is already registered")
        self._kernels[kernel.name] = kernel
        return kernel

    def get(self, name: str) -> GemmKernel:
        try:
            return self._kernels[name]
        except KeyError:
            raise ValueError(f"unknown kernel {name!r}; registered kernels: {sorted(self._kernels)}") from None

    def unregister(self, name: str) -> GemmKernel:
        """Remove ``name`` (and its padded variant, if one was made); returns the kernel."""
        kernel = self.get(name)
        for other in [k for k in self._kernels.values() if k.inner is kernel]:
            del self._kernels[other.name]
        return self._kernels.pop(name)

    def names(self) -> list[str]:
        return list(self._kernels)

    def __iter__(self):
        return iter(self._kernels.values())

    def __contains__(self, name: str) -> bool:
        return name in self._kernels


def default_candidates(registry: "KernelRegistry | None" = None) -> list[str]:
    """Names of the FP8 kernels considered when the caller names none (not hp, not ``emulated``,
    not marked ``not_default``)."""
    reg = KERNELS if registry is None else registry
    return [k.name for k in reg if not k.hp and not k.reference and not k.not_default]


def reference_kernel() -> GemmKernel:
    """The numerical reference every kernel is tested against (``reference``: ``emulated``)."""
    return next(k for k in KERNELS if k.reference)


def modelled_kernels(arch: str | None = None) -> list[str]:
    """Names of the kernels the speed model prices (``modelled``), of those running on ``arch`` if given."""
    return [k.name for k in KERNELS if k.modelled and (arch is None or arch in k.archs)]


def auto_preference() -> list[str]:
    """Kernel names ``kernels="auto"`` tries, in order (``auto_rank``)."""
    ranked = [k for k in KERNELS if k.auto_rank is not None]
    return [k.name for k in sorted(ranked, key=lambda k: k.auto_rank)]


def arch_kernels(arch: str) -> tuple[str, ...]:
    """Names of the registered kernels that run ``arch``'s recipes natively (``archs``), in registry order."""
    return tuple(k.name for k in KERNELS if arch in k.archs)


KERNELS = KernelRegistry()
