"""Triton device functions shared by loka's fused FP8 kernels: amax, scale, cast.

Why this file exists: the fused GEMM (triton_gemm_kernel.py) and the fused
norm + quantize (triton_norm_quant_kernel.py) must quantize exactly like
``loka.quantize.quantize`` does, bit for bit, so that they can be tested
against it. The rules implemented here are that module's:

- amax over finite values only (NaN/Inf do not poison a row's scale);
- ``scale = max(amax * RCP_FMAX, 2**-126)``, 1 where amax is 0, optionally
  rounded up to a power of two; ``RCP_FMAX`` is ``Float8Format.rcp_max``, the
  float32 nearest to ``1 / fmax``, so kernel and reference multiply the same
  bits (why a multiply and not a division: loka/quantize.py's docstring);
- ``x / scale`` with IEEE division (``div_rn``, not the approximate ``/``),
  clamped to ``±fmax``, non-finite results become NaN (e4m3 has no Inf; for
  e5m2 loka.quantize keeps ±Inf, these kernels write NaN: the one deviation);
- round to nearest even.

The cast itself has two implementations, picked by the constexpr ``EMULATE``:

- native (GPU): ``.to(tl.float8e4nv)``, the hardware's saturating
  round-to-nearest-even conversion (sm_89+);
- emulated: the rounding done in float32/int32 arithmetic
  (``fp8_round_emulated``) and the byte built by hand (``fp8_encode_emulated``).
  This is what runs under ``TRITON_INTERPRET=1``, because triton 3.9's
  interpreter converts float32 -> float8e4nv wrongly: it drops the carry of
  the rounding into the exponent (7.94 -> 4.0), rounds ties away from zero,
  wraps instead of saturating (1000 -> 256) and turns NaN into 384. Its
  float8 -> float32/float16 conversion (used by ``tl.dot`` on float8 inputs)
  is right for every finite value, NaN excepted.

This module imports triton at top level; import it only when a kernel is
launched (triton_gemm.py and triton_norm_quant.py do so lazily).
"""

from __future__ import annotations

import triton
import triton.language as tl

from loka.formats import get_format

# Constexpr parameters of each FP8 format, in the names the device functions take.
FP8_CONSTEXPRS: dict[str, dict[str, object]] = {
    # FMAX: largest finite; RCP_FMAX: float32 nearest 1/FMAX (the scale rule's
    # factor); MBITS: stored mantissa bits; EMIN: exponent of the smallest normal;
    # EXP_BIAS; NAN_BYTE / INF_BYTE: the encodings torch uses (INF_BYTE < 0: no Inf).
    name: dict(FMAX=get_format(name).max, RCP_FMAX=get_format(name).rcp_max, **codes)
    for name, codes in (
        ("e4m3", dict(MBITS=3, EMIN=-6, EXP_BIAS=7, NAN_BYTE=0x7F, INF_BYTE=-1)),
        ("e5m2", dict(MBITS=2, EMIN=-14, EXP_BIAS=15, NAN_BYTE=0x7E, INF_BYTE=0x7C)),
    )
}


def fp8_constexprs(fmt: str) -> dict[str, object]:
    """The constexpr keyword arguments a kernel needs to quantize to ``fmt``."""
    out = dict(FP8_CONSTEXPRS[fmt])
    out["FP8_DTYPE"] = tl.float8e4nv if fmt == "e4m3" else tl.float8e5
    return out


@triton.jit
def finite_abs(x):
    """|x| with NaN and ±Inf replaced by 0 (amax over finite values only)."""
    ax = tl.abs(x)
    return tl.where(ax < float("inf"), ax, 0.0)


@triton.jit
def fp8_scale_from_amax(amax, RCP_FMAX: tl.constexpr, POW2: tl.constexpr):
    """Dequant scale from a finite amax >= 0: ``max(amax * RCP_FMAX, 2**-126)``, 1 if amax == 0.

    ``RCP_FMAX`` is exactly a float32, so triton's float32 constant holds it
    without rounding and the product is one ``mul.rn.f32``, the same bits as
    ``loka.quantize.scale_from_amax``. The zero test is on the bits (amax >= 0),
    so a subnormal amax counts as nonzero even where the GPU flushes subnormals.
    """
    positive = amax.to(tl.int32, bitcast=True) > 0
    scale = tl.where(positive, amax * RCP_FMAX, 1.0)
    scale = tl.maximum(scale, 1.1754943508222875e-38)  # 2**-126, the smallest normal float32
    if POW2:
        # Round up to a power of two: keep the exponent when the mantissa is 0, else add 1.
        bits = scale.to(tl.int32, bitcast=True)
        up = (bits & 0x7F800000) + 0x00800000
        scale = tl.where((bits & 0x007FFFFF) != 0, up, bits).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def fp8_scale_and_clamp(x, scale, FMAX: tl.constexpr, POW2: tl.constexpr):
    """``x / scale`` clamped to ±FMAX, NaN where the quotient is not finite (float32).

    With power-of-two scales the reciprocal is exact, so a multiply gives the
    IEEE quotient bit for bit; otherwise the division is IEEE ``div_rn`` (about
    ten instructions per element; a reciprocal multiply would differ from
    loka.quantize near FP8 rounding ties).
    """
    if POW2:
        y = x * tl.math.div_rn(1.0, scale)
    else:
        y = tl.math.div_rn(x, scale)
    finite = tl.abs(y) < float("inf")
    y_clamped = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    return tl.where(finite, y_clamped, float("nan"))


@triton.jit
def fp8_round_emulated(y, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Round float32 ``y`` (|y| <= fmax or NaN) to the nearest-even FP8 value, kept in float32.

    The FP8 spacing at |y| is ``ulp = 2**(max(e, EMIN) - MBITS)`` with ``e`` the
    float32 exponent of |y|; ``|y| / ulp < 2**(MBITS+1)``, so adding and removing
    1.5 * 2**23 rounds it to an integer with the float32 adder's nearest-even rule.
    Scaling by powers of two is exact, so the result is exactly representable.
    """
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MBITS
    inv_ulp = ((127 - e) << 23).to(tl.float32, bitcast=True)
    ulp = ((127 + e) << 23).to(tl.float32, bitcast=True)
    t = a * inv_ulp
    t = (t + 12582912.0) - 12582912.0
    r = t * ulp
    negative = y.to(tl.int32, bitcast=True) < 0  # the sign bit, so -0.0 stays -0.0
    return tl.where(negative, -r, r)


@triton.jit
def fp8_encode_emulated(r, MBITS: tl.constexpr, EMIN: tl.constexpr, EXP_BIAS: tl.constexpr,
                        NAN_BYTE: tl.constexpr, INF_BYTE: tl.constexpr):
    """The FP8 byte (uint8) of a float32 ``r`` already on the FP8 grid (or NaN/±Inf)."""
    a = tl.abs(r)
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    normal_code = ((e + EXP_BIAS) << MBITS) | ((bits >> (23 - MBITS)) & ((1 << MBITS) - 1))
    # Subnormals (and 0) are integer multiples of 2**(EMIN - MBITS).
    to_units = tl.full(a.shape, (127 + MBITS - EMIN) << 23, tl.int32).to(tl.float32, bitcast=True)
    subnormal_code = (tl.where(e < EMIN, a, 0.0) * to_units).to(tl.int32)
    code = tl.where(e >= EMIN, normal_code, subnormal_code)
    if INF_BYTE >= 0:
        code = tl.where(a == float("inf"), INF_BYTE, code)
    code = tl.where(a != a, NAN_BYTE, code)
    sign = tl.where(r.to(tl.int32, bitcast=True) < 0, 0x80, 0)
    sign = tl.where(a != a, 0, sign)  # torch writes NaN with the sign bit clear
    return (code | sign).to(tl.uint8)


@triton.jit
def round_to_bf16_emulated(x):
    """float32 ``x`` rounded to the nearest-even bfloat16 value, kept in float32.

    For the interpreter, whose float32 -> bfloat16 cast truncates: after this the
    cast is exact. NaN and ±Inf survive (the added bits stay inside the mantissa).
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000 as int32
    return bits.to(tl.float32, bitcast=True)
