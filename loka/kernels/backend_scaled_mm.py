"""``scaled_mm``: cuBLASLt (NVIDIA) / hipBLASLt (ROCm) FP8 GEMMs through ``torch._scaled_mm``.

Takes tensorwise or rowwise recipes (both operands the same granularity),
not e5m2 x e5m2, with K and N multiples of 16 (cuBLASLt's alignment rule; we
apply it on CPU too so that a plan valid here is valid on a GPU). Runs on
sm_89+ GPUs, on MI300/MI350 (ROCm), and on CPU with torch builds that implement FP8
``_scaled_mm`` (per granularity, probed by running it: CPU rowwise only from torch 2.13).
Element formats follow the device (loka/devices.py): OCP e4m3/e5m2 on NVIDIA and gfx950,
the fnuz encodings on gfx942 (hipBLASLt; untested here), either on CPU.
"""

from __future__ import annotations

import functools

import torch

from loka.quantize import quantize_operand
from loka.recipe import GemmRecipe

from loka.kernels.kernel import (
    NVIDIA_FP8_ARCHS,
    OCP_FP8,
    YES,
    GemmKernel,
    Quantized,
    Shape,
    Support,
    check_operands,
    formats_problem,
    no,
    quantized_out_dtype,
)

FNUZ_FP8 = ("e4m3fnuz", "e5m2fnuz")

ALIGN = 16


@functools.lru_cache(maxsize=None)
def cpu_scaled_mm_support(granularity: str = "tensorwise") -> Support:
    """Whether this torch build runs FP8 ``_scaled_mm`` on CPU with ``granularity`` scales.

    Probed per granularity by running it once, not by version: tensorwise runs on CPU from
    torch 2.11 on, rowwise only from 2.13 (2.11 raises), and a later build may add or drop either.
    """
    if not hasattr(torch, "_scaled_mm"):
        return no("torch._scaled_mm is missing from this torch build")
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)  # [M=16, K=16]
    if granularity == "rowwise":
        scale_a, scale_b = torch.ones(16, 1), torch.ones(1, 16)  # [M, 1], [1, N]
    else:
        scale_a = scale_b = torch.ones(())
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        return no(f"torch {torch.__version__} runs no {granularity} FP8 _scaled_mm on CPU (tried: "
                  f"{type(exc).__name__}); use tensorwise or the emulated kernel here")
    return YES


def _cuda_support(device: torch.device) -> Support:
    if not torch.cuda.is_available():
        return no("CUDA is not available")
    if torch.version.hip:
        arch = _rocm_arch(device)
        return YES if arch in ("gfx942", "gfx950") else no(f"FP8 on ROCm needs gfx942/gfx950, this GPU is {arch}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return no(f"FP8 tensor cores need sm_89+, this GPU is sm_{major}{minor}")
    return YES


def _rocm_arch(device: torch.device) -> str:
    return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]


def device_formats(device) -> tuple[str, ...]:
    """The FP8 encodings ``torch._scaled_mm`` multiplies on ``device``: fnuz on gfx942, OCP on other
    GPUs, both on CPU (the CPU kernel takes either)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return OCP_FP8 + FNUZ_FP8
    if torch.version.hip and _rocm_arch(device) == "gfx942":
        return FNUZ_FP8
    return OCP_FP8


def scaled_mm_recipe_problem(recipe: GemmRecipe, who: str, formats: tuple[str, ...] = OCP_FP8) -> str | None:
    """Why torch._scaled_mm (used by ``who``) cannot take ``recipe``, or None if it can."""
    if recipe.is_hp:
        return f"{who} runs FP8 GEMMs only; this GEMM is hp"
    problem = formats_problem(recipe, formats, who)
    if problem:
        return problem
    ga, gb = recipe.a.granularity, recipe.b.granularity
    if ga != gb or ga not in ("tensorwise", "rowwise"):
        return f"{who} takes tensorwise or rowwise on both operands, got {ga} x {gb}"
    if recipe.a.format.startswith("e5m2") and recipe.b.format.startswith("e5m2"):
        return f"{who} (torch._scaled_mm) has no e5m2 x e5m2 GEMM"
    return None


def scaled_mm_device_support(recipe: GemmRecipe, device) -> Support:
    """Whether ``_scaled_mm`` runs ``recipe``'s granularity on ``device`` (CPU: probed per granularity)."""
    if torch.device(device).type != "cpu":
        return YES
    return cpu_scaled_mm_support(recipe.a.granularity)


class ScaledMMKernel(GemmKernel):
    """torch._scaled_mm with tensorwise or rowwise float32 scales."""

    name = "scaled_mm"
    backend = "scaled_mm"
    modelled = True
    auto_rank = 0
    torch_scaled_mm = True
    archs = NVIDIA_FP8_ARCHS | {"gfx942", "gfx950"}
    fast_accum = False
    takes_quantized_a = True

    def available(self, device=None) -> Support:
        device = torch.device(device or "cpu")
        if not hasattr(torch, "_scaled_mm"):
            return no("torch._scaled_mm is missing from this torch build")
        if device.type == "cuda":
            return _cuda_support(device)
        cpu_scaled_mm_support("rowwise")  # probed now, eagerly, never first inside a torch.compile trace
        return cpu_scaled_mm_support("tensorwise")

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        problem = scaled_mm_recipe_problem(recipe, "scaled_mm", device_formats(device))
        if problem:
            return no(problem)
        m, k, n = shape
        if k % ALIGN:
            return no(f"K={k} is not a multiple of {ALIGN}")
        if n % ALIGN:
            return no(f"N={n} is not a multiple of {ALIGN}")
        return scaled_mm_device_support(recipe, device)

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        m, k, n = check_operands(a, b)
        a_data = a.data if isinstance(a, Quantized) else a
        ok, reason = self.supports(recipe, (m, k, n), a_data.dtype, a_data.device)
        if not ok:
            raise ValueError(f"scaled_mm cannot run this GEMM [M={m}, K={k}, N={n}]: {reason}")
        out_dtype = out_dtype or quantized_out_dtype(a)
        a_fp8, sa = _fp8(a, recipe.a, scale_a)
        b_fp8, sb = _fp8(b, recipe.b, scale_b)
        rowwise = recipe.a.granularity == "rowwise"
        if rowwise:
            # A per-tensor (delayed/static) scale broadcasts onto the rowwise layout.
            sa = sa.expand(m, 1) if sa.dim() == 0 else sa
            sb = sb.expand(n, 1) if sb.dim() == 0 else sb
        # cuBLASLt's rowwise FP8 GEMM writes bf16; an fp32 caller gets that result upcast.
        mm_dtype = torch.bfloat16 if rowwise and a_fp8.is_cuda and out_dtype == torch.float32 else out_dtype
        out = torch._scaled_mm(
            a_fp8.contiguous(),
            b_fp8.contiguous().t(),  # column-major [K, N]
            scale_a=sa.float().contiguous(),
            scale_b=(sb.float().reshape(1, n) if rowwise else sb.float()).contiguous(),
            out_dtype=mm_dtype,
            use_fast_accum=self.fast_accum,
        )
        return out.to(out_dtype)


def _fp8(x, op, scale):
    """(fp8 data, dequant scale) of an operand: a pre-quantized one as it is, else quantized now."""
    return (x.data, x.scale) if isinstance(x, Quantized) else quantize_operand(x, op, scale)


class ScaledMMFastAccumKernel(ScaledMMKernel):
    """scaled_mm with cuBLASLt fast accumulation (faster on Hopper, less precise)."""

    name = "scaled_mm_fast_accum"
    modelled = False  # priced as scaled_mm
    auto_rank = None
    archs = NVIDIA_FP8_ARCHS
    fast_accum = True
