"""``scaled_mm_mx`` and ``scaled_mm_nvfp4``: block-scaled GEMMs through ``torch.nn.functional.scaled_mm``.

Blackwell (sm100) multiplies MXFP8 (e4m3/e5m2 elements, 1x32 blocks, e8m0 scales) and NVFP4
(e2m1 elements, 1x16 blocks, e4m3 scales) on its tensor cores; torch exposes them through
``F.scaled_mm`` with ``ScalingType.BlockWise1x32`` / ``BlockWise1x16`` (feature-checked here:
older torch builds lack them). The operands are quantized by loka.quantize (so the elements and
scales are the emulated reference's, bit for bit); only the scales' layout changes: cuBLAS reads
them swizzled in 128x4 tiles (:func:`swizzle_scales`, the layout of cuBLAS's "1D block scaling
factors" and torchao's ``to_blocked``). NVFP4's fp32 tensor scales multiply the output (they are
one number per operand, so ``(A sa)(B sb)ᵀ = (A Bᵀ) sa sb``), after a bf16 GEMM output.
MI350 (gfx950) runs MX through hipBLASLt with unswizzled scales.

Both were written without the hardware (there is no sm100 or gfx950 in loka's CI): they are
marked ``untested``, and tests/dispatch/test_block_scaled_kernels.py compares them with the
emulated reference where such a GPU is lent.
"""

from __future__ import annotations

import torch

from loka.formats import as_e8m0, pack_fp4
from loka.kernels.kernel import YES, GemmKernel, Quantized, Shape, Support, check_operands, no
from loka.quantize import quantize_operand
from loka.recipe import GemmRecipe

_MX_FORMATS = ("e4m3", "e5m2")


def _scaled_mm_api(block: str) -> Support:
    """Whether this torch has ``F.scaled_mm`` with ``ScalingType.<block>`` (feature check, no device)."""
    fn = getattr(torch.nn.functional, "scaled_mm", None)
    scaling = getattr(torch.nn.functional, "ScalingType", None)
    if fn is None or scaling is None or not hasattr(scaling, block):
        return no(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with ScalingType.{block}")
    return YES


def _device_arch(device) -> str:
    """``sm100``-style or ``gfx950``-style name of a GPU; ``cpu`` otherwise."""
    device = torch.device(device or "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type
    if torch.version.hip:
        return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """``scale[rows, cols]`` (one per 1xB block) padded to 128x4 tiles and rearranged as cuBLAS reads
    block scales: tile (i, j) holds rows 128i.. and columns 4j.., each as [32, 4, 4] (row r -> r % 32,
    (r // 32) % 4). Returns the flat rearranged tensor (dtype kept; padding is zeros)."""
    rows, cols = scale.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = scale.new_zeros((pr, pc))
    padded[:rows, :cols] = scale
    blocks = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


class _BlockScaledBase(GemmKernel):
    backend = "scaled_mm"
    takes_quantized_b = False
    torch_scaled_mm = True
    untested = True
    exact_quantization = True
    granularity: str
    block: str  # F.ScalingType member
    archs: tuple[str, ...]
    k_multiple: int

    def available(self, device=None) -> Support:
        ok = _scaled_mm_api(self.block)
        if not ok:
            return ok
        arch = _device_arch(device)
        if arch not in self.archs:
            return no(f"{self.name} needs a GPU of {'/'.join(self.archs)}; device is {arch}")
        return YES

    def _operand_problem(self, recipe: GemmRecipe) -> str | None:
        raise NotImplementedError

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        if recipe.is_hp:
            return no(f"{self.name} runs block-scaled GEMMs only; this GEMM is hp")
        a, b = recipe.a, recipe.b
        if a.granularity != self.granularity or b.granularity != self.granularity:
            return no(f"{self.name} takes {self.granularity} x {self.granularity}, got {a.granularity} x {b.granularity}")
        if a.scaling != "dynamic" or b.scaling != "dynamic":
            return no(f"{self.name} scales dynamically only (one scale per block of the tensor being cast)")
        problem = self._operand_problem(recipe)
        if problem:
            return no(problem)
        m, k, n = shape
        if k % self.k_multiple:
            return no(f"K={k} is not a multiple of {self.k_multiple}")
        if n % 16 or m % 16:
            return no(f"M={m} and N={n} must be multiples of 16")
        return YES

    def _check(self, a, b, recipe) -> tuple[int, int, int]:
        m, k, n = check_operands(a, b)
        if isinstance(a, Quantized) or isinstance(b, Quantized):
            raise ValueError(f"{self.name} quantizes both operands itself; pass high-precision a and b")
        ok, reason = self.supports(recipe, (m, k, n), a.dtype, a.device)
        if not ok:
            raise ValueError(f"{self.name} cannot run this GEMM [M={m}, K={k}, N={n}]: {reason}")
        return m, k, n

    def _swizzle(self, scale: torch.Tensor) -> tuple[torch.Tensor, object]:
        F = torch.nn.functional
        if torch.version.hip:  # hipBLASLt reads the scales row-major
            return scale.contiguous(), F.SwizzleType.NO_SWIZZLE
        return swizzle_scales(scale), F.SwizzleType.SWIZZLE_32_4_4


class ScaledMMMXKernel(_BlockScaledBase):
    """MXFP8 GEMM: e4m3/e5m2 elements, 1x32 blocks, e8m0 scales (sm100, gfx950)."""

    name = "scaled_mm_mx"
    archs = frozenset({"sm100", "gfx950"})
    granularity = "mx"
    block = "BlockWise1x32"
    archs = ("sm100", "sm103", "gfx950")
    k_multiple = 32

    def _operand_problem(self, recipe: GemmRecipe) -> str | None:
        a, b = recipe.a, recipe.b
        if a.block != (1, 32) or b.block != (1, 32):
            return f"{self.name} takes 1x32 MX blocks, got {a.block} x {b.block}"
        if a.format not in _MX_FORMATS or b.format not in _MX_FORMATS:
            return f"{self.name} takes e4m3/e5m2 elements, got {a.format} x {b.format}"
        if a.format == "e5m2" and b.format == "e5m2":
            return f"{self.name} has no e5m2 x e5m2 GEMM"
        return None

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        F = torch.nn.functional
        self._check(a, b, recipe)
        out_dtype = out_dtype or a.dtype
        a_q, sa = quantize_operand(a, recipe.a)  # [M, K] fp8, [M, K/32] powers of two
        b_q, sb = quantize_operand(b, recipe.b)
        sa_sw, swz = self._swizzle(as_e8m0(sa))
        sb_sw, _ = self._swizzle(as_e8m0(sb))
        out = F.scaled_mm(a_q, b_q.t(), scale_a=sa_sw, scale_recipe_a=F.ScalingType.BlockWise1x32,
                          scale_b=sb_sw, scale_recipe_b=F.ScalingType.BlockWise1x32, swizzle_a=swz, swizzle_b=swz,
                          output_dtype=torch.bfloat16)  # [M, K] · [K, N] (column-major) -> [M, N]
        return out.to(out_dtype)


class ScaledMMNVFP4Kernel(_BlockScaledBase):
    """NVFP4 GEMM: e2m1 elements, 1x16 blocks with e4m3 scales, fp32 tensor scales (sm100)."""

    name = "scaled_mm_nvfp4"
    archs = frozenset({"sm100"})
    granularity = "nvfp4"
    block = "BlockWise1x16"
    archs = ("sm100", "sm103")
    k_multiple = 32  # two FP4 values per byte, and 16-byte rows

    def _operand_problem(self, recipe: GemmRecipe) -> str | None:
        return None  # OperandRecipe already ties nvfp4 to e2m1 in 1x16 blocks

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        F = torch.nn.functional
        self._check(a, b, recipe)
        out_dtype = out_dtype or a.dtype
        a_codes, sa = quantize_operand(a, recipe.a)  # [M, K] uint8 codes, Nvfp4Scale
        b_codes, sb = quantize_operand(b, recipe.b)
        sa_sw, swz = self._swizzle(sa.block_e4m3())
        sb_sw, _ = self._swizzle(sb.block_e4m3())
        out = F.scaled_mm(pack_fp4(a_codes), pack_fp4(b_codes).t(), scale_a=sa_sw,
                          scale_recipe_a=F.ScalingType.BlockWise1x16, scale_b=sb_sw,
                          scale_recipe_b=F.ScalingType.BlockWise1x16, swizzle_a=swz, swizzle_b=swz,
                          output_dtype=torch.bfloat16)  # [M, K/2] · [K/2, N] packed -> [M, N]
        return (out.float() * (sa.tensor * sb.tensor)).to(out_dtype)
