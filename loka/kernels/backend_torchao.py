"""``torchao`` kernels: FP8 GEMMs through torchao's own casts and GEMM paths.

torchao exposes float8 training as a module swap (``convert_to_float8_training``);
loka needs it one GEMM at a time, so these kernels call the layer below the
module: torchao's cast (``hp_tensor_and_scale_to_float8`` / ``tensor_to_scale``,
which builds a ``Float8TrainingTensor``) and ``torch.mm`` on two such tensors,
which torchao routes to ``torch._scaled_mm`` exactly as its ``Float8Linear``
does for fprop (``output``), dgrad (``grad_input``) and wgrad (``grad_weight``).
So every GEMM of a site is covered, and a site can mix torchao with others.

- ``torchao`` / ``torchao_fast_accum``: tensorwise and rowwise ("axiswise")
  scaling, the recipes torchao names ``tensorwise``, ``rowwise`` and
  ``rowwise_with_gw_hp`` (the last is rowwise with wgrad left to ``bf16``).
  torchao pads K to a multiple of 16 (``pad_inner_dim``), so only N must be aligned.
- ``torchao_blockwise``: 1x128 activations x 128x128 weights (fprop, dgrad) and
  1x128 x 1x128 (wgrad) through torchao's Triton kernels (prototype, sm_90).
- ``torchao_mx``: MXFP8 (e4m3 elements, 32-element blocks, e8m0 scales)
  through ``MXTensor`` and cuBLAS's MX GEMM (prototype, sm_100).

How torchao's cast differs from loka.quantize (why the shared test compares by
SQNR, not bit for bit, unless scales are powers of two): torchao multiplies by
``fmax / amax`` (a float32 rounded from float64) where loka divides by
``amax * fl32(1 / fmax)``; it clamps amax at 1e-12 instead of the scale at 2**-126; and
its amax is not NaN/Inf-aware (one Inf in a group makes that group's output
NaN). The blockwise and MX kernels need a GPU and were written against
torchao 0.18's prototype API without one: they are marked untested.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from loka.formats import get_format
from loka.kernels.backend_scaled_mm import ScaledMMKernel, scaled_mm_device_support, scaled_mm_recipe_problem
from loka.kernels.kernel import NVIDIA_FP8_ARCHS, YES, GemmKernel, Quantized, Shape, Support, check_operands, no
from loka.quantize import MIN_SCALE, round_up_pow2
from loka.recipe import GemmRecipe

ALIGN = 16
# Float8TrainingTensor roles of (a, b) per GEMM, as torchao's Float8Linear uses them.
_ROLES = {"fprop": ("INPUT", "WEIGHT"), "dgrad": ("GRAD_OUTPUT", "WEIGHT"), "wgrad": ("GRAD_OUTPUT", "INPUT")}


@functools.lru_cache(maxsize=None)
def torchao_import() -> Support:
    """Whether ``torchao.float8`` imports here (probed once, lazily)."""
    if importlib.util.find_spec("torchao") is None:
        return no("torchao: not installed (pip install torchao)")
    try:
        importlib.import_module("torchao.float8")
    except Exception as exc:  # a broken install must be reported by name, not crash dispatch
        return no(f"torchao: import failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return YES


def _cuda_capability_at_least(device: torch.device, cap: tuple[int, int], what: str) -> Support:
    if device.type != "cuda":
        return no(f"{what} needs a CUDA GPU with sm_{cap[0]}{cap[1]}+; device is {device.type}")
    if not torch.cuda.is_available():
        return no("CUDA is not available")
    have = torch.cuda.get_device_capability(device)
    if have < cap:
        return no(f"{what} needs sm_{cap[0]}{cap[1]}+, this GPU is sm_{have[0]}{have[1]}")
    return YES


class _TorchaoBase(GemmKernel):
    def library_version(self) -> str:
        return f"torch {torch.__version__}, torchao {torchao_version()}"


class TorchaoKernel(_TorchaoBase):
    """torchao float8 training's tensorwise / rowwise GEMM (cast + ``torch._scaled_mm``)."""

    name = "torchao"
    archs = NVIDIA_FP8_ARCHS
    backend = "torchao"
    fast_accum = False
    nonfinite_amax = "poison"
    exact_quantization = False

    def available(self, device=None) -> Support:
        ok = torchao_import()
        if not ok:
            return ok

        # torchao's GEMM is torch._scaled_mm: it runs wherever scaled_mm does.
        why = ScaledMMKernel().available(device)
        return why if why else no(f"torchao runs torch._scaled_mm: {why.reason}")

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        problem = scaled_mm_recipe_problem(recipe, "torchao")
        if problem:
            return no(problem)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return no(f"torchao casts float32/bfloat16/float16 inputs, got {dtype}")
        _, _, n = shape
        if n % ALIGN:
            return no(f"N={n} is not a multiple of {ALIGN} (torchao pads K, not N)")
        return scaled_mm_device_support(recipe, device)

    def _mm_config(self):
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig  # optional: torchao, on first use

        cfg = ScaledMMConfig(emulate=False, use_fast_accum=self.fast_accum, fp8_output=False, pad_inner_dim=True)
        return LinearMMConfig(cfg, cfg, cfg)

    def _to_float8(self, x: torch.Tensor, op, role: str, dequant_scale: torch.Tensor | None, mm_config):
        """torchao's cast of ``x[R, K]``; scales along K (axiswise_dim=-1) for rowwise."""
        from torchao.float8.config import ScalingGranularity  # optional: torchao, on first use
        from torchao.float8.float8_training_tensor import GemmInputRole, hp_tensor_and_scale_to_float8  # optional: torchao, on first use
        from torchao.float8.float8_utils import tensor_to_scale  # optional: torchao, on first use

        fp8_dtype = get_format(op.format).dtype
        rowwise = op.granularity == "rowwise"
        axis = -1 if rowwise else None
        if dequant_scale is None:
            granularity = ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE
            scale = tensor_to_scale(x, fp8_dtype, scaling_granularity=granularity, axiswise_dim=axis,
                                    round_scales_to_power_of_2=op.pow2)
        else:
            # delayed/static: loka's dequant scale (rounded as loka.quantize does) -> torchao's
            # quant multiplier, broadcast per row.
            dequant_scale = dequant_scale.float().clamp_min(MIN_SCALE).to(x.device)
            scale = (round_up_pow2(dequant_scale) if op.pow2 else dequant_scale).reciprocal()
            scale = scale.expand(x.shape[0], 1).contiguous() if rowwise and scale.dim() == 0 else scale
        role_enum = GemmInputRole[role]
        return hp_tensor_and_scale_to_float8(x, scale, fp8_dtype, mm_config, role_enum, axis)

    def _wrap_quantized(self, b: Quantized, op, role: str, orig_dtype, mm_config):
        from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole  # optional: torchao, on first use

        axis = -1 if op.granularity == "rowwise" else None
        return Float8TrainingTensor(b.data, b.scale.float().reciprocal(), orig_dtype, mm_config, GemmInputRole[role], axis)

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        m, k, n = check_operands(a, b)
        ok, reason = self.supports(recipe, (m, k, n), a.dtype, a.device)
        if not ok:
            raise ValueError(f"{self.name} cannot run this GEMM [M={m}, K={k}, N={n}]: {reason}")
        out_dtype = out_dtype or a.dtype
        # Roles only select which of torchao's three (identical here) GEMM configs applies.
        a_role, b_role = _ROLES["fprop"]
        cfg = self._mm_config()
        a_f8 = self._to_float8(a, recipe.a, a_role, scale_a, cfg)
        if isinstance(b, Quantized):
            b_f8 = self._wrap_quantized(b, recipe.b, b_role, a.dtype, cfg)
        else:
            b_f8 = self._to_float8(b, recipe.b, b_role, scale_b, cfg)
        # [M, K] · ([N, K]ᵀ = [K, N] column-major) -> [M, N], torchao's preprocess_addmm + _scaled_mm
        out = torch.mm(a_f8, b_f8.t())
        return out.to(out_dtype)


class TorchaoFastAccumKernel(TorchaoKernel):
    """torchao with cuBLASLt fast accumulation (torchao's default for fprop)."""

    name = "torchao_fast_accum"
    fast_accum = True


class TorchaoBlockwiseKernel(_TorchaoBase):
    """torchao's blockwise FP8 (DeepSeek-style) Triton GEMMs. Untested here (needs sm_90)."""

    name = "torchao_blockwise"
    archs = frozenset({"sm90"})
    takes_quantized_b = False  # quantizes b itself
    backend = "torchao"
    nonfinite_amax = "poison"
    exact_quantization = False
    untested = True

    def available(self, device=None) -> Support:
        ok = torchao_import()
        if not ok:
            return ok
        if importlib.util.find_spec("torchao.prototype.blockwise_fp8_training") is None:
            return no("torchao: this version has no prototype.blockwise_fp8_training")
        return _cuda_capability_at_least(torch.device(device or "cpu"), (9, 0), "torchao blockwise (Triton)")

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        if recipe.is_hp:
            return no("torchao_blockwise runs FP8 GEMMs only; this GEMM is hp")
        a, b = recipe.a, recipe.b
        if a.granularity != "blockwise" or b.granularity != "blockwise":
            return no(f"torchao_blockwise takes blockwise x blockwise, got {a.granularity} x {b.granularity}")
        if a.block != (1, 128) or b.block not in ((128, 128), (1, 128)):
            return no(f"torchao_blockwise takes 1x128 x (128x128 | 1x128) blocks, got {a.block} x {b.block}")
        if a.format != "e4m3" or b.format != "e4m3":
            return no("torchao_blockwise casts to e4m3 only (its recipe has no e5m2 gradients)")
        if a.scaling != "dynamic" or b.scaling != "dynamic":
            return no("torchao_blockwise scales dynamically only")
        m, k, n = shape
        if k % 128 or n % 128:
            return no(f"K={k} and N={n} must be multiples of 128 (whole scale blocks)")
        if b.block == (1, 128) and m % 128:
            return no(f"M={m} must be a multiple of 128 for the 1x128 x 128x1 (wgrad) kernel")
        return YES

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        from torchao.prototype.blockwise_fp8_training import kernels as bk  # optional: torchao, on first use

        m, k, n = check_operands(a, b)
        ok, reason = self.supports(recipe, (m, k, n), a.dtype, a.device)
        if not ok or isinstance(b, Quantized):
            raise ValueError(f"torchao_blockwise cannot run this GEMM [M={m}, K={k}, N={n}]: {reason or 'pre-quantized b'}")
        out_dtype = out_dtype or a.dtype
        a_fp8, a_s = bk.triton_fp8_blockwise_act_quant_lhs(a.contiguous(), 128)
        if recipe.b.block == (128, 128):
            # b[N, K] is a weight: 128x128 blocks, handed over as [K, N] column-major.
            b_t_fp8, b_t_s = bk.triton_fp8_blockwise_weight_quant_transposed_rhs(b.contiguous(), block_size=128)
            out = bk.triton_fp8_gemm_1x128_128x128(a_fp8, b_t_fp8, a_s, b_t_s, out_dtype=torch.bfloat16)
        else:
            # wgrad: b[N, K] with 1x128 groups along K == [K, N] with 128x1 groups.
            b_t_fp8, b_t_s = bk.triton_fp8_blockwise_act_quant_rhs(b.t().contiguous(), 128)
            out = bk.triton_fp8_gemm_1x128_128x1(a_fp8, b_t_fp8, a_s, b_t_s, out_dtype=torch.bfloat16)
        return out.to(out_dtype)


class TorchaoMXKernel(_TorchaoBase):
    """torchao's MXFP8 GEMM (``MXTensor`` + cuBLAS MX). Untested here (needs sm_100)."""

    name = "torchao_mx"
    archs = frozenset({"sm100"})
    takes_quantized_b = False  # quantizes b itself
    backend = "torchao"
    nonfinite_amax = "poison"
    exact_quantization = False
    untested = True

    def available(self, device=None) -> Support:
        ok = torchao_import()
        if not ok:
            return ok
        if importlib.util.find_spec("torchao.prototype.mx_formats") is None:
            return no("torchao: this version has no prototype.mx_formats")
        return _cuda_capability_at_least(torch.device(device or "cpu"), (10, 0), "MXFP8 GEMMs (cuBLAS)")

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        if recipe.is_hp:
            return no("torchao_mx runs FP8 GEMMs only; this GEMM is hp")
        a, b = recipe.a, recipe.b
        if a.granularity != "mx" or b.granularity != "mx" or a.block != (1, 32) or b.block != (1, 32):
            return no("torchao_mx takes mx x mx with 1x32 blocks")
        if a.format != "e4m3" or b.format != "e4m3":
            return no("torchao_mx's GEMM takes e4m3 x e4m3 elements only")
        if a.scaling != "dynamic" or b.scaling != "dynamic":
            return no("torchao_mx scales dynamically only")
        if a.mx_scale_rule != b.mx_scale_rule:
            return no("torchao_mx takes one MX scale rule for both operands")
        if dtype not in (torch.float32, torch.bfloat16):
            return no(f"torchao_mx casts float32/bfloat16 inputs, got {dtype}")
        m, k, n = shape
        if k % 32:
            return no(f"K={k} is not a multiple of 32 (MX block)")
        if n % ALIGN or m % ALIGN:
            return no(f"M={m} and N={n} must be multiples of {ALIGN}")
        return YES

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        from torchao.prototype.mx_formats.config import ScaleCalculationMode  # optional: torchao, on first use
        from torchao.prototype.mx_formats.mx_tensor import MXTensor  # optional: torchao, on first use
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference  # optional: torchao, on first use

        m, k, n = check_operands(a, b)
        ok, reason = self.supports(recipe, (m, k, n), a.dtype, a.device)
        if not ok or isinstance(b, Quantized):
            raise ValueError(f"torchao_mx cannot run this GEMM [M={m}, K={k}, N={n}]: {reason or 'pre-quantized b'}")
        out_dtype = out_dtype or a.dtype
        # The recipe's MX scale rule (loka.recipe.MX_SCALE_RULES): "floor" is torchao's FLOOR bit for bit
        # (tests/core/test_mx_nvfp4.py); "round_up" is RCEIL, which rounds the e8m0 scale up as loka does
        # (they can differ where amax / fmax rounds onto a power of two).
        mode = ScaleCalculationMode.FLOOR if recipe.a.mx_scale_rule == "floor" else ScaleCalculationMode.RCEIL
        kw = dict(block_size=32, scaling_mode=mode, kernel_preference=KernelPreference.AUTO)
        a_mx = MXTensor.to_mx(a.contiguous(), torch.float8_e4m3fn, **kw)
        b_mx = MXTensor.to_mx(b.contiguous(), torch.float8_e4m3fn, **kw)
        return torch.mm(a_mx, b_mx.t()).to(out_dtype)  # [M, K] · [K, N] -> [M, N] (bf16 from cuBLAS)


def torchao_version() -> str | None:
    if not torchao_import():
        return None
    import torchao  # optional: torchao, on first use

    return getattr(torchao, "__version__", "unknown")

