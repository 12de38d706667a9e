"""``te``: FP8 GEMMs through NVIDIA Transformer Engine's quantizers and cuBLASLt GEMM.

Transformer Engine (TE) is used through ``te.Linear`` under ``te.autocast``;
loka needs one GEMM at a time, so this kernel calls the two layers below the
module that ``te.Linear`` itself calls: a *quantizer* (which casts a tensor to
a TE ``Float8Tensor`` / ``MXFP8Tensor`` / ``Float8BlockwiseQTensor``) and
``general_gemm`` (cuBLASLt). One kernel covers TE's recipes, chosen by the
loka recipe of the GEMM:

    loka recipe                         TE quantizer (TE recipe)                  GPU
    tensorwise, dynamic                 Float8CurrentScalingQuantizer              sm_89+
                                        (Float8CurrentScaling)
    tensorwise, delayed / static        Float8Quantizer with loka's scale          sm_89+
                                        (DelayedScaling's cast; the amax history
                                        is loka's ScaleState)
    blockwise 1x128 x 128x128 / 1x128   Float8BlockQuantizer, dims 1 / 2           sm_90
                                        (Float8BlockScaling)
    mx (1x32, e8m0 scales)              MXFP8Quantizer (MXFP8BlockScaling)         sm_100+

Every GEMM (fprop, dgrad, wgrad) is ``out[M,N] = a[M,K] · b[N,K]ᵀ``, which is
TE's "TN" layout with A=b and B=a (TE, like cuBLAS, is column-major).

Transformer Engine is optional (``pip install loka[te]``); when it is missing,
``available()`` says so and the kernel is skipped. This file was written
against TE 2.x's Python API without a GPU or TE to run it: it is marked
untested and ``loka doctor`` says so.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from loka.recipe import GemmRecipe

from loka.kernels.kernel import (
    NVIDIA_FP8_ARCHS, OCP_FP8, YES, GemmKernel, Quantized, Shape, Support, check_operands, formats_problem, no,
)

ALIGN = 16
_MIN_CAPABILITY = {"tensorwise": (8, 9), "blockwise": (9, 0), "mx": (10, 0)}


@functools.lru_cache(maxsize=None)
def te_import() -> Support:
    """Whether ``transformer_engine.pytorch`` imports (probed once, lazily)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return no("te: not installed (pip install loka[te])")
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # a broken install is reported by name
        return no(f"te: import failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return YES


def te_version() -> str | None:
    if not te_import():
        return None
    import transformer_engine  # optional: TE may be absent

    return getattr(transformer_engine, "__version__", "unknown")


def _te_dtype(fmt: str):
    import transformer_engine_torch as tex  # optional: TE may be absent

    return tex.DType.kFloat8E4M3 if fmt == "e4m3" else tex.DType.kFloat8E5M2


@functools.lru_cache(maxsize=None)
def _workspace(device_index: int) -> torch.Tensor:
    """cuBLASLt workspace: TE's own when it exposes one, else 32 MiB of ours."""
    base = importlib.import_module("transformer_engine.pytorch.module.base")
    if hasattr(base, "get_workspace"):
        return base.get_workspace()
    return torch.empty(32 * 1024 * 1024, dtype=torch.uint8, device=torch.device("cuda", device_index))


class TEKernel(GemmKernel):
    """Transformer Engine cast + cuBLASLt GEMM for tensorwise, blockwise and MXFP8 recipes."""

    name = "te"
    archs = NVIDIA_FP8_ARCHS
    takes_quantized_b = False  # quantizes b itself
    backend = "te"
    exact_quantization = False
    nonfinite_amax = "poison"
    untested = True

    def library_version(self) -> str:
        return f"torch {torch.__version__}, transformer_engine {te_version()}"

    def available(self, device=None) -> Support:
        ok = te_import()
        if not ok:
            return ok
        device = torch.device(device or "cpu")
        if device.type != "cuda":
            return no(f"te runs on CUDA GPUs only; device is {device.type}")
        if not torch.cuda.is_available():
            return no("CUDA is not available")
        have = torch.cuda.get_device_capability(device)
        if have < (8, 9):
            return no(f"te FP8 needs sm_89+, this GPU is sm_{have[0]}{have[1]}")
        return YES

    def supports(self, recipe: GemmRecipe, shape: Shape, dtype: torch.dtype, device) -> Support:
        if recipe.is_hp:
            return no("te runs FP8 GEMMs only; this GEMM is hp")
        a, b = recipe.a, recipe.b
        if a.granularity != b.granularity or a.granularity not in _MIN_CAPABILITY:
            return no(f"te takes tensorwise, blockwise or mx on both operands, got {a.granularity} x {b.granularity}")
        problem = formats_problem(recipe, OCP_FP8, "te")
        if problem:
            return no(problem)
        if a.format == "e5m2" and b.format == "e5m2":
            return no("te (cuBLASLt) has no e5m2 x e5m2 GEMM")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return no(f"te casts float32/bfloat16/float16 inputs, got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            need, have = _MIN_CAPABILITY[a.granularity], torch.cuda.get_device_capability(device)
            if have < need:
                return no(f"te {a.granularity} needs sm_{need[0]}{need[1]}+, this GPU is sm_{have[0]}{have[1]}")
        return _shape_support(recipe, shape)

    def _quantizer(self, op, dequant_scale: torch.Tensor | None, device):
        """The TE quantizer for one operand, set to produce K-contiguous (rowwise) data only."""
        fp8 = _te_dtype(op.format)
        if op.granularity == "tensorwise":
            f8 = importlib.import_module("transformer_engine.pytorch.tensor.float8_tensor")
            if dequant_scale is None:
                return f8.Float8CurrentScalingQuantizer(fp8, device, rowwise=True, columnwise=False, force_pow_2_scales=op.pow2)
            scale = dequant_scale.float().reshape(1).reciprocal().to(device)  # TE scales multiply
            amax = torch.zeros(1, dtype=torch.float32, device=device)
            return f8.Float8Quantizer(scale, amax, fp8, rowwise=True, columnwise=False)
        if op.granularity == "blockwise":
            bw = importlib.import_module("transformer_engine.pytorch.tensor.float8_blockwise_tensor")
            dim = 2 if op.block == (128, 128) else 1
            return bw.Float8BlockQuantizer(fp8, rowwise=True, columnwise=False, block_scaling_dim=dim,
                                            force_pow_2_scales=op.pow2)
        mx = importlib.import_module("transformer_engine.pytorch.tensor.mxfp8_tensor")
        return mx.MXFP8Quantizer(fp8, rowwise=True, columnwise=False)

    def mm(self, a, b, recipe, *, scale_a=None, scale_b=None, out_dtype=None):
        m, k, n = check_operands(a, b)
        ok, reason = self.supports(recipe, (m, k, n), a.dtype, a.device)
        if not ok:
            raise ValueError(f"te cannot run this GEMM [M={m}, K={k}, N={n}]: {reason}")
        if isinstance(b, Quantized):
            raise ValueError("te quantizes b itself; pass the high-precision b (te keeps its own weight cache)")
        from transformer_engine.pytorch.cpp_extensions import general_gemm  # optional: TE may be absent

        out_dtype = out_dtype or a.dtype
        a_q = self._quantizer(recipe.a, scale_a, a.device)(a.contiguous())
        b_q = self._quantizer(recipe.b, scale_b, a.device)(b.contiguous())
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        # TE/cuBLAS "TN": out[M, N] = B[M, K] · A[N, K]ᵀ with A = b, B = a (te.Linear's fprop call).
        out, *_ = general_gemm(b_q, a_q, _workspace(index), out_dtype=out_dtype, layout="TN")
        return out


def _shape_support(recipe: GemmRecipe, shape: Shape) -> Support:
    m, k, n = shape
    g = recipe.a.granularity
    if g == "tensorwise":
        if k % ALIGN or n % ALIGN:
            return no(f"te needs K and N multiples of {ALIGN}, got K={k}, N={n}")
        return YES
    if g == "blockwise":
        if k % 128 or n % ALIGN:
            return no(f"te blockwise needs K a multiple of 128 and N of {ALIGN}, got K={k}, N={n}")
        return YES
    if k % 32 or n % 32 or m % 32:
        return no(f"te MXFP8 needs M, K and N multiples of 32, got M={m}, K={k}, N={n}")
    return YES
