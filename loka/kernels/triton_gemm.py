"""FP8 GEMM with the activation's dynamic quantization fused in, for ranker-sized shapes.

Why this exists: rankers are made of small and skinny GEMMs (M 1k..32k, K, N
64..2048). At those sizes the FP8 GEMM itself is cheap and the per-call
quantization of the activation (an amax pass, a cast pass, an FP8 copy in HBM)
is what makes FP8 slower than bf16 (measured: bench/results/h100_2026-11-22_gemm.md
and bench/results/h200_2026-11-30_gemm_triton.md). The
Triton kernel here reads the high-precision activation straight into
registers, computes each row's amax there, casts and multiplies, and never
writes an FP8 copy (triton_gemm_kernel.py says how often a is re-read).

    out[M, N] = (quant(a_hp)[M, K] · b_fp8[N, K]ᵀ) * scale_a[M, 1] * scale_bᵀ[1, N] + bias[N]

- ``a_hp``: bf16/fp16/fp32, quantized to ``a_format`` with ``granularity``
  ``"rowwise"`` (per-row amax over K, fused) or ``"tensorwise"`` (one amax from
  a small Triton pre-pass that only reads ``a``), or with a given ``a_scale``.
- ``b_fp8``: already FP8 (the weight), with a tensorwise (0-dim) or rowwise
  ``[N, 1]`` dequant scale, as ``loka.quantize.quantize`` returns them.
- float32 accumulation (``fast_accum=True`` allows Hopper's faster, less
  precise FP8 accumulation), scales and bias in the epilogue.

``fp8_mm`` runs the same kernel on an ``a`` quantized beforehand (the output of
``fused_norm_quant``, say), with no alignment rule on M, K, N.

``fp8_mm_fused_quant_reference`` is the same math in plain PyTorch on top of
``loka.quantize.quantize``; it equals the ``emulated`` kernel's result up to
float32 rounding of the scale products. Runs on CUDA sm_89+ (compiled,
autotuned) or on CPU under ``TRITON_INTERPRET=1`` (one fixed tile; the FP8 cast
emulated bit-exactly in float32, see triton_fp8_jit.py).
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from loka.quantize import MIN_SCALE, quantize, round_up_pow2

A_FORMATS = ("e4m3", "e5m2")
A_GRANULARITIES = ("rowwise", "tensorwise")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401  # optional: probes whether triton imports here, without importing it for loka
    except ImportError as exc:  # reported by name, never swallowed
        return False, f"triton: not installed ({exc})"
    return True, ""


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` here: ``(ok, reason)``.

    CPU needs ``TRITON_INTERPRET=1`` in the environment before the kernels are
    first imported; CUDA needs an sm_89+ GPU (FP8 tensor cores). Asked lazily,
    never at import.
    """
    ok, reason = _triton_import()
    if not ok:
        return ok, reason
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        if not interpreting():
            return False, "triton: CPU tensors need TRITON_INTERPRET=1 set before the kernels are imported"
        return True, ""
    if device.type != "cuda":
        return False, f"triton: device type {device.type!r} is not supported"
    if not torch.cuda.is_available():
        return False, "triton: CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"triton: FP8 dot needs sm_89+, this GPU is sm_{major}{minor}"
    return True, ""


def kernels():
    """The kernel module (imports triton and defines the kernels on first call)."""
    from loka.kernels import triton_gemm_kernel  # optional: imports triton and defines the kernels on first use

    return triton_gemm_kernel


def interpreting() -> bool:
    """True when the kernels are (or, once imported, will be) run by triton's CPU interpreter."""
    mod = sys.modules.get("loka.kernels.triton_gemm_kernel")
    if mod is None:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    from triton.runtime.interpreter import InterpretedFunction  # optional: triton, once its kernels are imported

    return isinstance(mod.fp8_gemm_fused_quant_kernel, InterpretedFunction)


def _check_inputs(a_hp, b_fp8, b_scale, a_format, granularity, a_scale, bias, out_dtype) -> None:
    if a_format not in A_FORMATS:
        raise ValueError(f"a_format={a_format!r} is not valid; use one of {list(A_FORMATS)}")
    if granularity not in A_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not valid; use one of {list(A_GRANULARITIES)}")
    if not a_hp.is_floating_point() or a_hp.dtype in FP8_DTYPES:
        raise TypeError(f"a_hp must be a bf16/fp16/fp32 tensor, got {a_hp.dtype}")
    rows = _check_b(a_hp, b_fp8, b_scale, bias, out_dtype)
    if a_scale is not None and a_scale.numel() != (1 if granularity == "tensorwise" else rows):
        raise ValueError(f"a_scale{tuple(a_scale.shape)} does not match {granularity} scaling of a{tuple(a_hp.shape)}")


def _check_b(a, b_fp8, b_scale, bias, out_dtype) -> int:
    """Check b, its scale, bias and out_dtype against a[..., K]; returns M (rows of a)."""
    if b_fp8.dtype not in FP8_DTYPES or b_fp8.dim() != 2:
        raise TypeError(f"b_fp8 must be a 2-D float8_e4m3fn/float8_e5m2 tensor, got {b_fp8.dtype} {tuple(b_fp8.shape)}")
    n, k = b_fp8.shape
    if a.dim() < 1 or a.shape[-1] != k:
        raise ValueError(f"a{tuple(a.shape)} must end in K={k}, b_fp8's reduction dim")
    if b_scale.numel() not in (1, n):
        raise ValueError(f"b_scale{tuple(b_scale.shape)} must be tensorwise (one value) or rowwise [N={n}, 1]")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [N={n}], got {tuple(bias.shape)}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} is not valid; use one of {list(OUT_DTYPES)}")
    return a.numel() // max(k, 1)


def _given_scale(scale: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """A precomputed scale prepared exactly as loka.quantize.quantize prepares one."""
    scale = scale.float().clamp_min(MIN_SCALE)
    return round_up_pow2(scale) if pow2_scale else scale


def fp8_mm_fused_quant_reference(
    a_hp: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    a_format: str = "e4m3",
    granularity: str = "rowwise",
    a_scale: torch.Tensor | None = None,
    pow2_scale: bool = False,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The kernel's math in PyTorch: ``(q(a) @ b.T) * s_a * s_bᵀ + bias``. a[..., K], b[N, K] -> [..., N]"""
    _check_inputs(a_hp, b_fp8, b_scale, a_format, granularity, a_scale, bias, out_dtype)
    n, k = b_fp8.shape
    a2 = a_hp.reshape(-1, k)
    a_q, s_a = quantize(a2, a_format, granularity, scale=a_scale, pow2_scale=pow2_scale)
    acc = a_q.float() @ b_fp8.float().t()  # [M, N] fp32: exact products, fp32 sums
    out = acc * s_a.reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or a_hp.dtype).reshape(*a_hp.shape[:-1], n)


def fp8_mm_fused_quant(
    a_hp: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    a_format: str = "e4m3",
    granularity: str = "rowwise",
    a_scale: torch.Tensor | None = None,
    pow2_scale: bool = False,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    fast_accum: bool = False,
    emulate: bool | None = None,
    tile: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """FP8 GEMM of a high-precision ``a[..., K]`` and FP8 ``b[N, K]`` -> ``[..., N]`` (see module doc).

    ``a_scale``: precomputed dequant scale for a (rowwise ``[M, 1]`` or a scalar;
    delayed/static scaling); None quantizes dynamically inside the kernel.
    ``emulate``: do the FP8 cast in float32 arithmetic and the dot in float32
    (bit-exact with the native path; default only under the interpreter).
    ``tile``: fixed ``(BLOCK_M, BLOCK_N, BLOCK_K[, N_TILES])`` instead of autotuning.
    """
    _check_inputs(a_hp, b_fp8, b_scale, a_format, granularity, a_scale, bias, out_dtype)
    _require_triton(a_hp.device, "fp8_mm_fused_quant")
    mod = kernels()
    a2 = a_hp.reshape(-1, b_fp8.shape[1])
    out = torch.empty((a2.shape[0], b_fp8.shape[0]), dtype=out_dtype or a_hp.dtype, device=a_hp.device)
    if out.numel():
        mode, a_scale_arg = _a_scale_arg(mod, a2, granularity, a_scale, pow2_scale)
        _run(mod, a2, b_fp8, b_scale, out, mode, a_scale_arg, bias, a_format=a_format, pow2_scale=pow2_scale,
             fast_accum=fast_accum, emulate=emulate, tile=tile, a_is_fp8=False)
    return out.reshape(*a_hp.shape[:-1], b_fp8.shape[0])


def fp8_mm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
    emulate: bool | None = None,
    tile: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The same kernel on an ``a`` quantized beforehand (e.g. by ``fused_norm_quant``).

    ``a_fp8[..., K]`` with a rowwise ``[..., 1]`` or tensorwise scale; any M, K, N
    (no alignment rule, unlike torch._scaled_mm). Under the interpreter a NaN
    byte in ``a_fp8`` or ``b_fp8`` reads as 480 (its float8 -> float32 decode).
    """
    _check_fp8_inputs(a_fp8, a_scale, b_fp8, b_scale, bias, out_dtype)
    _require_triton(a_fp8.device, "fp8_mm")
    mod = kernels()
    a2 = a_fp8.reshape(-1, b_fp8.shape[1])
    out = torch.empty((a2.shape[0], b_fp8.shape[0]), dtype=out_dtype, device=a_fp8.device)
    if out.numel():
        rowwise = a_scale.numel() > 1 or a_scale.dim() == a_fp8.dim()
        mode = mod.A_ROWWISE_GIVEN if rowwise else mod.A_TENSOR_GIVEN
        a_scale_arg = a_scale.float().reshape(-1).contiguous()
        _run(mod, a2, b_fp8, b_scale, out, mode, a_scale_arg, bias, a_format=FP8_DTYPES[a_fp8.dtype],
             pow2_scale=False, fast_accum=fast_accum, emulate=emulate, tile=tile, a_is_fp8=True)
    return out.reshape(*a_fp8.shape[:-1], b_fp8.shape[0])


def fp8_mm_reference(a_fp8, a_scale, b_fp8, b_scale, *, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """``fp8_mm`` in PyTorch: ``(a @ b.T) * s_a * s_bᵀ + bias``. a[..., K], b[N, K] -> [..., N]"""
    _check_fp8_inputs(a_fp8, a_scale, b_fp8, b_scale, bias, out_dtype)
    n, k = b_fp8.shape
    acc = a_fp8.reshape(-1, k).float() @ b_fp8.float().t()
    out = acc * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    out = out if bias is None else out + bias.float()
    return out.to(out_dtype).reshape(*a_fp8.shape[:-1], n)


def _check_fp8_inputs(a_fp8, a_scale, b_fp8, b_scale, bias, out_dtype) -> None:
    if a_fp8.dtype not in FP8_DTYPES:
        raise TypeError(f"a_fp8 must be float8_e4m3fn/float8_e5m2, got {a_fp8.dtype}; use fp8_mm_fused_quant for hp a")
    rows = _check_b(a_fp8, b_fp8, b_scale, bias, out_dtype)
    if a_scale.numel() not in (1, rows):
        raise ValueError(f"a_scale{tuple(a_scale.shape)} must be tensorwise (one value) or rowwise [M={rows}, 1]")


def _require_triton(device: torch.device, what: str) -> None:
    ok, reason = triton_available(device)
    if not ok:
        raise RuntimeError(f"{what} cannot run on {device}: {reason}")


def _run(mod, a2, b_fp8, b_scale, out, mode, a_scale_arg, bias, *, a_format, pow2_scale, fast_accum, emulate,
         tile, a_is_fp8) -> None:
    """Launch the GEMM kernel: autotuned, or on ``tile`` (the interpreter's by default there)."""
    from loka.kernels.triton_fp8_jit import fp8_constexprs  # optional: imports triton

    (m, k), n = a2.shape, b_fp8.shape[0]
    interp = interpreting()
    b_scale_arg = b_scale.float().reshape(-1).contiguous()
    fmt = fp8_constexprs(a_format)
    launch = dict(
        A_SCALE_MODE=mode, B_ROWWISE=b_scale_arg.numel() > 1, HAS_BIAS=bias is not None, POW2=pow2_scale,
        FAST_ACCUM=fast_accum, EMULATE=interp if emulate is None else emulate, A_IS_FP8=a_is_fp8,
        FMAX=fmt["FMAX"], RCP_FMAX=fmt["RCP_FMAX"], MBITS=fmt["MBITS"], EMIN=fmt["EMIN"], FP8_DTYPE=fmt["FP8_DTYPE"],
        GROUP_M=mod.GROUP_M,
    )
    args = (a2, b_fp8, out, a_scale_arg, b_scale_arg, bias.contiguous() if bias is not None else b_scale_arg,
            m, n, k, triton_next_pow2(m), *a2.stride(), *b_fp8.stride(), *out.stride())
    grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"] * meta["N_TILES"]),)  # noqa: E731
    if tile is None and not interp:
        mod.fp8_gemm_fused_quant_tuned[grid](*args, **launch)
        return
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "N_TILES")
    blocks = mod.INTERPRETER_TILE if tile is None else dict(zip(names, (*tile, 1)))  # N_TILES defaults to 1
    mod.fp8_gemm_fused_quant_kernel[grid](*args, **launch, **blocks)


def _a_scale_arg(mod, a2: torch.Tensor, granularity: str, a_scale, pow2_scale: bool) -> tuple[int, torch.Tensor]:
    """(A_SCALE_MODE, the float32 tensor the kernel reads for a's scale)."""
    if a_scale is not None:
        s = _given_scale(a_scale.to(a2.device), pow2_scale).reshape(-1).contiguous()
        return (mod.A_ROWWISE_GIVEN if granularity == "rowwise" else mod.A_TENSOR_GIVEN), s
    if granularity == "rowwise":
        return mod.A_ROWWISE_DYNAMIC, torch.empty(1, dtype=torch.float32, device=a2.device)
    amax = torch.zeros(1, dtype=torch.float32, device=a2.device)
    bm, bk = 64, 128
    mod.finite_amax_kernel[(_cdiv(a2.shape[0], bm),)](a2, amax, a2.shape[0], a2.shape[1], *a2.stride(),
                                                     BLOCK_M=bm, BLOCK_K=bk)
    return mod.A_TENSOR_AMAX, amax


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(x: int) -> int:
    """Autotuning bucket for M: configs are tuned per power-of-two M, not per exact M."""
    return 1 << max(0, (x - 1).bit_length())
