"""Quantize and dequantize tensors to FP8 at every granularity loka supports.

One function does the cast for all recipes so that every kernel, the probe and
the emulated reference agree bit for bit on what "quantized with recipe R"
means. Conventions (shared with torch._scaled_mm):

- Scale groups run along the **last** dim, the GEMM's reduction dim. A 2-D
  ``x[R, C]`` gets a scale of shape ``[]`` (tensorwise), ``[R, 1]`` (rowwise) or
  ``[ceil(R/br), ceil(C/bc)]`` (blockwise / mx with block ``(br, bc)``).
- ``scale`` is the **dequantization** multiplier: ``x ≈ x_fp8.float() * scale``.
- ``scale = max(amax * rcp_fmax, 2**-126)`` in float32, with ``rcp_fmax`` the
  float32 nearest to ``1 / fmax`` (``Float8Format.rcp_max``) and ``amax == 0``
  giving scale 1, so a zero row or tensor never divides by zero; ``pow2`` rounds
  the scale *up* to a power of two (exact via frexp). ``|x| / scale <= fmax``
  still holds after rounding: ``rcp_fmax`` is 0.75 ulp above ``1 / fmax`` for
  both formats, so the scale is at most a quarter ulp below ``amax / fmax``.
- The cast divides: ``x / scale`` is one IEEE (correctly rounded) float32
  division, with the scale a tensor on ``x``'s device; the Triton kernels use
  ``div_rn`` (with pow2 scales, a multiply by the exact reciprocal: the same bits).
- The cast saturates: finite values are clamped to ``±fmax`` before rounding
  to nearest-even. Non-finite values pass through (NaN stays NaN; ±Inf becomes
  NaN in e4m3, which has no Inf, and stays ±Inf in e5m2).
- ``nonfinite="skip"`` computes amax over finite values only (so one Inf does
  not zero a whole group); ``"raise"`` raises :class:`NonFiniteError`.

Why the scale is a multiply and the cast a division. A rule that must give the
same bits on every device has to survive each backend's rewriting. One float32
multiply by an exactly representable constant is correctly rounded everywhere:
CPU and CUDA eager (constant as a Python float or a tensor), Triton (``*`` is
``mul.rn.f32``) and torch.compile (inductor keeps a multiply a multiply). A
division by ``fmax`` is not: CUDA eager evaluates ``tensor / python_scalar`` as
``tensor * fl32(1 / scalar)`` (what it computed before this rule, while the CPU
divided: scales 1 ulp apart for half of all amax values, found on an H200 on
2026-11-30), inductor on GPU rewrites division by a constant as a multiply by
its reciprocal (torch 2.13 ``div_prim``), and Triton's ``/`` is an approximate
``div.full.f32``. For the element cast no such constant exists (the scale is
data), so the cast keeps a real division, written as tensor / tensor in eager
and ``div_rn`` in Triton; a reciprocal multiply there would move elements that
sit on FP8 rounding ties. One known gap: under torch.compile on CUDA inductor
emits the cast as Triton's approximate ``/`` unless
``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1``, so compiled FP8 values may differ
from eager on ties (the scales do not).
"""

from __future__ import annotations


import torch

from loka.callable_module import make_callable
from loka.formats import Float8Format, e2m1_codes, e2m1_values, get_format, round_stochastic, round_to_format
from loka.fp4 import NVFP4_BLOCK, Nvfp4Scale, nvfp4_dequantize, nvfp4_scaled, nvfp4_scales
from loka.recipe import ALL_GRANULARITIES, DEFAULT_MX_SCALE_RULE, MX_SCALE_RULES, OperandRecipe, default_block

MIN_SCALE = 2.0**-126  # smallest normal float32: keeps 1/scale finite
MAX_POW2_EXP = 127


class NonFiniteError(ValueError):
    """Raised when a tensor with NaN/Inf is quantized under ``nonfinite="raise"``."""


def group_shape(shape: torch.Size, granularity: str, block: tuple[int, int] | None) -> tuple[int, int] | None:
    if granularity not in ALL_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not valid; use one of {list(ALL_GRANULARITIES)}")
    if granularity == "tensorwise":
        return None
    if granularity == "rowwise":
        return (1, shape[-1])
    if granularity == "nvfp4":
        return NVFP4_BLOCK
    br, bc = block or default_block(granularity)
    if br != 1 and len(shape) != 2:
        raise ValueError(
            f"{granularity} with {br}x{bc} blocks needs a 2-D tensor, got shape {tuple(shape)}; "
            "reshape to [rows, reduction] first"
        )
    return (br, bc)


def _padded_blocks(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """View a 2-D ``x`` padded with zeros as ``[Rg, br, Cg, bc]`` blocks."""
    r, c = x.shape
    pr, pc = (-r) % br, (-c) % bc
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.reshape(x.shape[0] // br, br, x.shape[1] // bc, bc)


def group_amax(x: torch.Tensor, granularity: str, block: tuple[int, int] | None = None, *,
               finite_only: bool = True) -> torch.Tensor:
    """Per-group max of |x| in float32, shaped like the scale (see module doc); ``block`` defaults
    to the granularity's (``loka.recipe.default_block``)."""
    ax = x.detach().abs().float()
    if finite_only:
        ax = torch.nan_to_num(ax, nan=0.0, posinf=0.0)  # |x| >= 0: NaN and +Inf are the non-finite values
    group = group_shape(x.shape, granularity, block)
    if group is None:
        return ax.amax() if ax.numel() else torch.zeros((), device=ax.device)
    br, bc = group
    if br == 1 and bc == x.shape[-1]:
        return ax.amax(dim=-1, keepdim=True) if x.shape[-1] else torch.zeros((*x.shape[:-1], 1), device=ax.device)
    lead = x.shape[:-1]
    flat = ax.reshape(-1, x.shape[-1]) if br == 1 else ax
    amax = _padded_blocks(flat, br, bc).amax(dim=(1, 3))
    return amax.reshape(*lead, amax.shape[-1]) if br == 1 else amax


def scale_from_amax(amax: torch.Tensor, fmt: str | Float8Format, pow2: bool = False) -> torch.Tensor:
    """Dequantization scale(s) from amax(es): ``max(amax * rcp_fmax, 2**-126)``, 1 where amax is 0.

    The one scale rule of loka (module doc): every kernel computes it the same way.
    """
    f = get_format(fmt)
    amax = amax.float()
    scale = torch.where(amax > 0, amax * f.rcp_max, torch.ones_like(amax)).clamp_min(MIN_SCALE)
    if pow2:
        scale = round_up_pow2(scale)
    return scale


def mx_scale(amax: torch.Tensor, fmt: str | Float8Format, rule: str = DEFAULT_MX_SCALE_RULE) -> torch.Tensor:
    """Power-of-two (e8m0) MX block scale(s) from amax(es) by ``rule`` (module doc, loka.recipe.MX_SCALE_RULES)."""
    if rule not in MX_SCALE_RULES:
        raise ValueError(f"mx_scale_rule={rule!r} is not valid; use one of {list(MX_SCALE_RULES)}")
    f = get_format(fmt)
    if rule == "round_up":
        return scale_from_amax(amax, f, pow2=True)
    exp_field = (amax.float().view(torch.int32) >> 23) & 0xFF  # floor(log2 amax) + 127 for normal amax
    exp = (exp_field - 127 - f.emax).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float32), exp).clamp_min(MIN_SCALE)


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``scale`` (exact; finite positive inputs)."""
    mantissa, exponent = torch.frexp(scale)  # scale = m * 2**e, m in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent).clamp(max=MAX_POW2_EXP)
    return torch.ldexp(torch.ones_like(scale), exponent)


def expand_scale(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Broadcast a scale of any granularity to a tensor of ``shape``."""
    if scale.dim() == 0 or (scale.shape[-1] == 1 and tuple(scale.shape[:-1]) == tuple(shape[:-1])):
        return scale  # one scale per tensor or per row: plain broadcasting
    if block is None:
        raise ValueError(
            f"a scale of shape {tuple(scale.shape)} for a tensor of shape {tuple(shape)} is blockwise; "
            "pass block=(rows, cols) to say how it maps onto the tensor"
        )
    br, bc = block
    out = scale.repeat_interleave(bc, dim=-1)[..., : shape[-1]]
    if br != 1:
        out = out.repeat_interleave(br, dim=0)[: shape[0]]
    return out


def saturated_cast(x_scaled: torch.Tensor, fmt: str | Float8Format, rounding: str = "nearest") -> torch.Tensor:
    """Round float32 values to ``fmt``'s dtype (FP4: uint8 codes), clamping finite values to ±fmax;
    NaN/Inf pass through as the format can hold them (module doc)."""
    f = get_format(fmt)
    if f.bits == 4:  # no torch cast to FP4: round in float32, then look the codes up
        return e2m1_codes(_round(x_scaled.float().clamp(-f.max, f.max), f, rounding))
    x_sat = _saturate(x_scaled, f)
    return (x_sat if rounding == "nearest" else _round(x_sat, f, rounding)).to(f.dtype)


def _round(x_sat: torch.Tensor, f: Float8Format, rounding: str) -> torch.Tensor:
    """Saturated float32 values rounded onto ``f``'s grid, kept in float32."""
    if rounding == "stochastic":
        return torch.where(torch.isfinite(x_sat), round_stochastic(x_sat, f), x_sat)
    if rounding != "nearest":
        raise ValueError(f"rounding={rounding!r} is not valid; use 'nearest' or 'stochastic'")
    return round_to_format(x_sat, f)


def _saturate(x_scaled: torch.Tensor, f: Float8Format) -> torch.Tensor:
    """Finite values clamped to ±fmax in float32; ±Inf become NaN where the format has no Inf."""
    x_scaled = x_scaled.float()
    if not f.has_inf:
        # Not `x_scaled` itself: torch casts Inf to ±448 in e4m3fn, which would hide it. x - x is
        # +0 for finite x (so x - (x - x) == x, signed zeros included) and NaN for ±Inf/NaN, and
        # clamp keeps NaN: all in float arithmetic, which is several times cheaper than a mask.
        return (x_scaled - (x_scaled - x_scaled)).clamp(-f.max, f.max)
    return torch.where(torch.isfinite(x_scaled), x_scaled.clamp(-f.max, f.max), x_scaled)


def quantize(
    x: torch.Tensor,
    fmt: str | Float8Format = "e4m3",
    granularity: str = "tensorwise",
    *,
    block: tuple[int, int] | None = None,
    scale: torch.Tensor | None = None,
    pow2_scale: bool = False,
    nonfinite: str = "skip",
    mx_scale_rule: str = DEFAULT_MX_SCALE_RULE,
    rounding: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor | Nvfp4Scale]:
    """Quantize ``x[..., C]`` to ``fmt``; returns ``(x_q, scale)`` (see module doc).

    ``scale`` given (delayed/static scaling) is used as is and broadcast over
    the groups; otherwise it is computed from the groups' amax (dynamic).
    ``block`` defaults to the granularity's (``loka.recipe.default_block``: mx 1x32, as the
    named recipes). ``mx`` always uses power-of-two scales, by ``mx_scale_rule``.
    ``nvfp4`` (``fmt="e2m1"``) returns an ``Nvfp4Scale`` (loka/fp4.py).
    """
    f = get_format(fmt)
    if granularity == "nvfp4":
        scale = _nvfp4_scale_for(x, f, scale, nonfinite)
        return saturated_cast(nvfp4_scaled(x, scale), f, rounding), scale
    scale, group = _scale_for(x, f, granularity, block, scale, pow2_scale, nonfinite, mx_scale_rule)
    x_q = saturated_cast(x.float() / expand_scale(scale, x.shape, group), f, rounding)
    return x_q, scale


def _nvfp4_scale_for(x, f: Float8Format, scale, nonfinite: str) -> Nvfp4Scale:
    _check_input(x, nonfinite)
    if f.name != "e2m1":
        raise ValueError(f"granularity='nvfp4' quantizes to FP4: use fmt='e2m1', not {f.name!r}")
    if scale is not None:
        raise ValueError("nvfp4 scales are dynamic (computed from the tensor); call quantize without scale=")
    return nvfp4_scales(x)


def _check_input(x, nonfinite: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite={nonfinite!r} is not valid; use 'skip' or 'raise'")
    if nonfinite == "raise":
        _raise_if_nonfinite(x)


def _scale_for(x, f: Float8Format, granularity: str, block, scale, pow2_scale: bool, nonfinite: str,
               mx_scale_rule: str = DEFAULT_MX_SCALE_RULE):
    """``(scale, group shape)`` of a quantization of ``x``, after checking the arguments."""
    _check_input(x, nonfinite)
    group = group_shape(x.shape, granularity, block)
    pow2_scale = pow2_scale or granularity == "mx"  # e8m0 scales are powers of two
    if scale is None and granularity == "mx":
        scale = mx_scale(group_amax(x, granularity, group), f, mx_scale_rule)
    elif scale is None:
        scale = scale_from_amax(group_amax(x, granularity, group), f, pow2_scale)
    else:
        scale = scale.float().clamp_min(MIN_SCALE).to(x.device)
        scale = round_up_pow2(scale) if pow2_scale else scale
    return scale, group


def _raise_if_nonfinite(x: torch.Tensor) -> None:
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise NonFiniteError(
            f"tensor of shape {tuple(x.shape)} has {bad} NaN/Inf values; fix the model's numerics "
            "or quantize with nonfinite='skip' to ignore them for scaling and count them"
        )


def dequantize(
    x_fp8: torch.Tensor,
    scale: torch.Tensor | Nvfp4Scale,
    *,
    block: tuple[int, int] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x_q * scale`` in float32, cast to ``out_dtype``; ``block`` is needed for blockwise/mx scales.
    uint8 ``x_q`` are FP4 codes (an ``Nvfp4Scale`` or a power-of-two mx scale)."""
    values = e2m1_values(x_fp8) if x_fp8.dtype == torch.uint8 else x_fp8.float()
    if isinstance(scale, Nvfp4Scale):
        return nvfp4_dequantize(values, scale).to(out_dtype)
    return (values * expand_scale(scale, x_fp8.shape, block)).to(out_dtype)


def quantize_operand(x: torch.Tensor, op: OperandRecipe, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an operand as its recipe says (``op`` must not be ``hp``)."""
    if op.is_hp:
        raise ValueError("quantize_operand got an hp operand recipe; hp operands are not quantized")
    return quantize(
        x, op.format, op.granularity, block=op.block, scale=scale, pow2_scale=op.pow2, nonfinite=op.nonfinite,
        mx_scale_rule=op.mx_scale_rule, rounding=op.rounding,
    )


def operand_block(op: OperandRecipe, shape: torch.Size) -> tuple[int, int] | None:
    """The group shape ``expand_scale`` needs for a scale made by ``quantize_operand``."""
    return group_shape(shape, op.granularity, op.block)


def fake_quantize(x: torch.Tensor, op: OperandRecipe, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (the ``emulated`` cast), in ``x``'s dtype. hp returns ``x``.

    The same values as ``dequantize(*quantize_operand(x, op, scale))``, rounded in float32
    (``loka.formats.round_to_format``) rather than through an FP8 tensor.
    """
    if op.is_hp:
        return x
    f = get_format(op.format)
    if op.granularity == "nvfp4":
        nv = _nvfp4_scale_for(x, f, scale, op.nonfinite)
        return nvfp4_dequantize(_round(_saturate(nvfp4_scaled(x, nv), f), f, op.rounding), nv).to(x.dtype)
    scale, group = _scale_for(x, f, op.granularity, op.block, scale, op.pow2, op.nonfinite, op.mx_scale_rule)
    s = expand_scale(scale, x.shape, group)
    return (_round(_saturate(x.float() / s, f), f, op.rounding) * s).to(x.dtype)


def fraction_underflow_saturate(x: torch.Tensor, op: OperandRecipe) -> tuple[float, float]:
    """Fractions of nonzero finite values that would flush to zero / clamp at fmax under ``op``."""
    f = get_format(op.format)
    x = x.detach().float()
    finite = torch.isfinite(x) & (x != 0)
    n = int(finite.sum())
    if n == 0:
        return 0.0, 0.0
    if op.granularity == "nvfp4":
        y = nvfp4_scaled(x, nvfp4_scales(x)).abs()
    else:
        s, group = _scale_for(x, f, op.granularity, op.block, None, op.pow2, "skip", op.mx_scale_rule)
        y = (x / expand_scale(s, x.shape, group)).abs()
    under = int(((y < f.min_subnormal / 2) & finite).sum())
    sat = int(((y > f.max) & finite).sum())
    return under / n, sat / n


make_callable(__name__, quantize)  # loka.quantize(x, ...) is quantize(x, ...); loka.quantize.<name> the module's
