"""Fused LayerNorm/RMSNorm + FP8 rowwise quantize: one pass, FP8 out, for the next FP8 GEMM.

Why this exists: in a ranker every Norm -> Linear block pays for the norm
(read x, write y), then for the quantization of y (read y for amax, read y
again to cast, write y_fp8) before the FP8 GEMM reads y_fp8. A normalized row
is complete in registers when the norm kernel has it, so its amax is known
there: the fused kernel reads x once and writes only ``y_fp8`` (1 byte per
element) and one float32 scale per row.

Bytes moved per element of x (``M x N``, bf16 in, weights/bias ignored):

    norm + separate quantize:  read x (2) + write y (2) + read y twice (4) + write y_fp8 (1) = 9
    fused:                     read x (2) + write y_fp8 (1)                                    = 3

(``bench/norm_quant.py`` computes these exactly, scales included.)

Semantics: ``y = norm(x) * weight + bias`` in float32 (statistics in float32,
biased variance, like torch), then ``loka.quantize.quantize(y, fmt, "rowwise")``
on the float32 ``y``; the unfused path in a bf16 model would round ``y`` to
bf16 first, so the fused result is if anything closer to exact.
``norm_quant_reference`` is that math in PyTorch.

Training: the kernel is forward-only. Called directly on inputs that require
grad it refuses (the FP8 output cannot carry a gradient to the norm's input,
weight and bias). Training uses it inside ``loka.mods.norm_quant_autograd.NormQuantLinearFn``,
which calls it on detached inputs and defines the backward (the exact norm
backward on a recomputed high-precision norm), through ``fused_norm_quant_op``: the same
call as a ``torch.library`` op, which torch.compile keeps as one node of its graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loka.kernels.triton_gemm import interpreting, triton_available
from loka.quantize import quantize

KINDS = ("layernorm", "rmsnorm")
FORMATS = ("e4m3", "e5m2")
MAX_ROW = 16384  # one row lives in registers


def _check(x, weight, bias, kind, fmt) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not valid; use one of {list(KINDS)}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not valid; use one of {list(FORMATS)}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"x must be a bf16/fp16/fp32 tensor, got {x.dtype}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape [N={n}] (the normalized last dim), got {tuple(t.shape)}")
    if kind == "rmsnorm" and bias is not None:
        raise ValueError("rmsnorm has no bias; pass bias=None")


def norm_quant_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    kind: str = "layernorm",
    eps: float = 1e-5,
    fmt: str = "e4m3",
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_fp8[..., N], scale[..., 1], y_hp[..., N] float32)`` in plain PyTorch."""
    _check(x, weight, bias, kind, fmt)
    n = x.shape[-1]
    xf = x.float()
    w = None if weight is None else weight.float()
    if kind == "layernorm":
        y = F.layer_norm(xf, (n,), w, None if bias is None else bias.float(), eps)
    else:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = y if w is None else y * w
    y_fp8, scale = quantize(y, fmt, "rowwise", pow2_scale=pow2_scale)
    return y_fp8, scale, y


def fused_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    kind: str = "layernorm",
    eps: float = 1e-5,
    fmt: str = "e4m3",
    pow2_scale: bool = False,
    return_hp: bool = False,
    emulate: bool | None = None,
):
    """Norm + rowwise FP8 quantize of ``x[..., N]`` in one Triton pass.

    Returns ``(y_fp8[..., N], scale[..., 1] float32)``, plus the float32
    normalized ``y_hp`` when ``return_hp`` (for tests; costs a write).
    ``emulate`` builds the FP8 bytes in integer arithmetic (default only under
    the interpreter, whose float8 cast is wrong; see triton_fp8_jit.py).
    """
    _check(x, weight, bias, kind, fmt)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError(
            "fused_norm_quant is forward-only; call it under torch.no_grad() / torch.inference_mode(), "
            "and in training through loka.mods.NormQuantFloat8Linear (its autograd function defines the backward)"
        )
    ok, reason = triton_available(x.device)
    if not ok:
        raise RuntimeError(f"fused_norm_quant cannot run on {x.device}: {reason}")
    n = x.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"rows of {n} elements do not fit one program (max {MAX_ROW}); use norm_quant_reference")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    fp8_dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    y_fp8 = torch.empty((m, n), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    y_hp = torch.empty((m, n) if return_hp else (1,), dtype=torch.float32, device=x.device)
    if m:
        emulate = interpreting() if emulate is None else emulate
        _launch(x2, weight, bias, y_fp8, scale, y_hp, kind, eps, fmt, pow2_scale, return_hp, emulate)
    lead = x.shape[:-1]
    out = (y_fp8.reshape(*lead, n), scale.reshape(*lead, 1))
    return (*out, y_hp.reshape(*lead, n)) if return_hp else out


def _block_shape(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 4k-8k elements per program."""
    block_n = 1 << max(4, (n - 1).bit_length())
    block_m = max(1, min(64, 4096 // block_n))
    return block_m, block_n, min(16, max(4, block_n // 512))


def _launch(x2, weight, bias, y_fp8, scale, y_hp, kind, eps, fmt, pow2_scale, store_hp, emulate) -> None:
    from loka.kernels import triton_norm_quant_kernel as mod  # optional: imports triton, defines the kernel
    from loka.kernels.triton_fp8_jit import fp8_constexprs  # optional: imports triton

    m, n = x2.shape
    block_m, block_n, warps = _block_shape(n)
    dummy = scale  # any pointer for the absent weight/bias (never read)
    out_arg = y_fp8.view(torch.uint8) if emulate else y_fp8
    mod.norm_quant_kernel[(-(-m // block_m),)](
        x2, dummy if weight is None else weight.contiguous(), dummy if bias is None else bias.contiguous(),
        out_arg, scale, y_hp, m, n, x2.stride(0), y_fp8.stride(0), float(eps),
        IS_RMS=kind == "rmsnorm", HAS_W=weight is not None, HAS_B=bias is not None, STORE_HP=store_hp,
        POW2=pow2_scale, EMULATE=emulate, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        **fp8_constexprs(fmt),
    )


_OP: list = []  # the torch.library op wrapping fused_norm_quant, made on first use


def fused_norm_quant_op():
    """``fused_norm_quant`` as an opaque ``torch.library`` op (``loka::fused_norm_quant``), or None
    where this torch has no ``torch.library.custom_op``.

    Why: torch.compile then keeps the Triton launch as one node of its graph (shapes from the
    fake implementation) instead of tracing into the launcher, which under the Triton CPU
    interpreter fails outright. Same arguments and results as :func:`fused_norm_quant`
    (without ``return_hp`` / ``emulate``); inputs must not require grad.
    """
    if not _OP:
        _OP.append(_define_op())
    return _OP[0]


def _define_op():
    library = getattr(torch, "library", None)
    if library is None or not hasattr(library, "custom_op") or not hasattr(library, "register_fake"):
        return None
    schema = "(Tensor x, Tensor? weight, Tensor? bias, str kind, float eps, str fmt, bool pow2_scale) -> (Tensor, Tensor)"

    def run(x, weight, bias, kind, eps, fmt, pow2_scale):
        return fused_norm_quant(x, weight, bias, kind=kind, eps=eps, fmt=fmt, pow2_scale=pow2_scale)

    op = library.custom_op("loka::fused_norm_quant", run, mutates_args=(), schema=schema)

    def fake(x, weight, bias, kind, eps, fmt, pow2_scale):
        _check(x, weight, bias, kind, fmt)
        fp8 = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
        return x.new_empty(x.shape, dtype=fp8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)

    op.register_fake(fake)
    return op
