"""Element formats loka quantizes to (FP8 and FP4), the e8m0 scale format, and their limits.

Every cast, scale and error bound in loka is derived from these numbers, so they
live in one place.

- ``e4m3`` (torch.float8_e4m3fn, OCP) has more precision and a small range; it is the
  default for activations and weights. ``e5m2`` (OCP) has the range of fp16 with two
  mantissa bits; it is the default for gradients. NVIDIA (sm89+) and MI350 (gfx950) run these.
- ``e4m3fnuz`` / ``e5m2fnuz`` (torch.float8_e4m3fnuz / _e5m2fnuz): MI300's (gfx942) FP8.
  Exponent bias one larger than OCP (8 and 16), so the largest value is 240 / 57344 and the
  smallest subnormal 2**-10 / 2**-17; no Inf, no negative zero, and one NaN (code 0x80).
- ``e2m1`` (FP4, torch.float4_e2m1fn_x2 packs two): values 0, 0.5, 1, 1.5, 2, 3, 4, 6; no
  Inf, no NaN. Quantized FP4 is held as one code per uint8 (``dtype`` below); ``pack_fp4``
  packs two per byte for kernels.
- ``e8m0`` (torch.float8_e8m0fnu): the MX block *scale* format, a bare exponent 2**(code-127),
  code 255 = NaN. A power-of-two float32 scale converts to it exactly (:func:`e8m0_codes`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import torch

FormatName = Literal["e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz", "e2m1"]


@dataclass(frozen=True)
class Float8Format:
    """Limits of one element encoding (the FP8 ones and FP4 ``e2m1``).

    ``max`` is the largest finite value, ``min_normal`` the smallest positive
    normal, ``min_subnormal`` the smallest positive value, ``mantissa_bits`` the
    stored fraction bits, ``emax`` the exponent of ``max``. ``dtype`` is what a
    quantized tensor is stored as: the torch float8 dtype, or uint8 codes for FP4.
    ``negative_zero``: whether -0 has a code (not in the fnuz formats, where 0x80 is NaN).
    """

    name: FormatName
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int
    emax: int
    has_inf: bool
    bits: int = 8
    negative_zero: bool = True

    @property
    def emin(self) -> int:
        """The exponent of ``min_normal``."""
        return int(math.log2(self.min_normal))

    @property
    def eps(self) -> float:
        """Relative spacing of normal values (2^-mantissa_bits)."""
        return 2.0 ** -self.mantissa_bits

    @property
    def unit_roundoff(self) -> float:
        """Largest relative rounding error for normal values (eps / 2)."""
        return self.eps / 2

    @property
    def rcp_max(self) -> float:
        """``1 / max`` rounded to the nearest float32, held exactly in a Python float.

        Every FP8 scale in loka is ``amax * rcp_max`` (one float32 multiply; the
        rule and why are in loka/quantize.py's docstring); kernels take this
        constant from here so that they and the reference multiply by the same bits.
        """
        rcp = _RCP_MAX.get(self.max)
        if rcp is None:  # a format made at run time; the built-in ones are filled in at import
            rcp = _RCP_MAX[self.max] = _to_float32(1.0 / self.max)
        return rcp


def _to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (held exactly in a Python float)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# max -> fl32(1 / max), computed outside any trace: torch.compile must not trace struct.pack (on
# torch 2.13, with dynamic=True, dynamo's struct.pack polyfill calls itself until the recursion
# limit: every InferenceEngine(compile=True) with an FP8 plan crashed; tests/core/test_scale_rule.py).
_RCP_MAX: dict[float, float] = {}


E4M3 = Float8Format(
    name="e4m3",
    dtype=torch.float8_e4m3fn,
    max=448.0,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    mantissa_bits=3,
    emax=8,
    has_inf=False,
)
E5M2 = Float8Format(
    name="e5m2",
    dtype=torch.float8_e5m2,
    max=57344.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    mantissa_bits=2,
    emax=15,
    has_inf=True,
)

E4M3FNUZ = Float8Format(
    name="e4m3fnuz",
    dtype=torch.float8_e4m3fnuz,
    max=240.0,
    min_normal=2.0**-7,
    min_subnormal=2.0**-10,
    mantissa_bits=3,
    emax=7,
    has_inf=False,
    negative_zero=False,
)
E5M2FNUZ = Float8Format(
    name="e5m2fnuz",
    dtype=torch.float8_e5m2fnuz,
    max=57344.0,
    min_normal=2.0**-15,
    min_subnormal=2.0**-17,
    mantissa_bits=2,
    emax=15,
    has_inf=False,
    negative_zero=False,
)
E2M1 = Float8Format(
    name="e2m1",
    dtype=torch.uint8,  # one code per byte (sign << 3 | exponent << 1 | mantissa); pack_fp4 packs two
    max=6.0,
    min_normal=1.0,
    min_subnormal=0.5,
    mantissa_bits=1,
    emax=2,
    has_inf=False,
    bits=4,
)

FORMATS: dict[str, Float8Format] = {f.name: f for f in (E4M3, E5M2, E4M3FNUZ, E5M2FNUZ, E2M1)}
FP8_FORMATS: tuple[str, ...] = ("e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz")
FP4_FORMATS: tuple[str, ...] = ("e2m1",)
for _f in FORMATS.values():
    _f.rcp_max  # noqa: B018 (fills _RCP_MAX before any trace)


def get_format(name: str | Float8Format) -> Float8Format:
    """Look a format up by name (``"e4m3"``, ``"e5m2"``, ``"e4m3fnuz"``, ``"e5m2fnuz"``, ``"e2m1"``)."""
    if isinstance(name, Float8Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown element format {name!r}; use one of {sorted(FORMATS)}"
        ) from None



def round_to_format(x: torch.Tensor, fmt: "str | Float8Format") -> torch.Tensor:
    """``x`` rounded to the nearest value of ``fmt`` (ties to even), kept in float32.

    For ``x`` in ``[-fmax, fmax]`` (what saturation leaves), ±Inf (e5m2) or NaN this equals
    ``x.to(fmt.dtype).float()`` bit for bit, signed zeros included, without the FP8 dtype:
    adding ``c = 1.5 * 2**(e + 23 - m)``, with ``e`` the value's binary exponent clamped to the
    format's normal range and ``m`` its mantissa bits, leaves a float32 whose last bit weighs
    ``2**(e - m)``, the format's spacing at ``x`` (its subnormal spacing below the smallest
    normal), so the hardware's round-to-nearest-even does the rounding and ``- c`` is exact.
    The same rule rounds every format here, FP4 included (for which torch has no cast).
    On CPU it is about twice as fast as the FP8 cast round trip, which matters to the probe
    and the emulated kernels, which round the same operand under several recipes.
    """
    f = get_format(fmt)
    x = x.float()
    exp_bits = (x.view(torch.int32) & 0x7F800000).clamp((f.emin + 127) << 23, (f.emax + 127) << 23)
    c = (exp_bits + (((23 - f.mantissa_bits) << 23) | (1 << 22))).view(torch.float32)
    return ((x + c) - c).copysign(x)


def round_stochastic(x: torch.Tensor, fmt: "str | Float8Format", generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (finite values within ``±fmax``) rounded to one of its two neighbours in ``fmt``, up with
    probability equal to the distance from the lower one over the spacing: unbiased, ``E[r] = x``.

    The spacing at ``x`` is ``2**(e - m)`` as in :func:`round_to_format`; ``|x| / spacing`` and its
    floor are exact in float32, so the only randomness is the one uniform draw per element.
    NaN stays NaN.
    """
    f = get_format(fmt)
    x = x.float()
    exp = ((x.view(torch.int32) >> 23) & 0xFF).clamp(f.emin + 127, f.emax + 127) - 127
    spacing = torch.ldexp(torch.ones_like(x), exp - f.mantissa_bits)
    units = x.abs() / spacing  # exact: a division by a power of two
    low = units.floor()
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return ((low + (u < units - low).float()) * spacing).copysign(x)

# ---- FP4 codes ---------------------------------------------------------------------------------
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 -> |value|


def e2m1_codes(x_rounded: torch.Tensor) -> torch.Tensor:
    """uint8 codes of float32 values already on the e2m1 grid (``|x| <= 6``), sign in bit 3.

    NaN has no code: it becomes -0 (code 8), as ml_dtypes' float4_e2m1fn cast does for +NaN.
    """
    table = torch.tensor(E2M1_VALUES, device=x_rounded.device)
    mag = torch.searchsorted(table, x_rounded.abs().nan_to_num(0.0).contiguous()).clamp(max=7).to(torch.uint8)
    sign = (torch.signbit(x_rounded) | torch.isnan(x_rounded)).to(torch.uint8) << 3
    return sign | mag


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of e2m1 uint8 codes."""
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``codes[..., C]`` (uint8, C even) packed two per byte as torch.float4_e2m1fn_x2 ``[..., C/2]``.

    Element ``2i`` goes in the low nibble, ``2i+1`` in the high one (torchao's ``pack_uint4``
    layout, which torch._scaled_mm's FP4 path reads).
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}; pad it with zeros")
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous().view(torch.float4_e2m1fn_x2)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 codes ``[..., 2 * C/2]``."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


# ---- e8m0 scales -------------------------------------------------------------------------------
E8M0_BIAS = 127


def e8m0_codes(scale_pow2: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 codes (``127 + log2 scale``) of positive power-of-two float32 scales.

    Exact for every power of two in [2**-127, 2**127]; read the float32 exponent field (so a
    scale that is not a power of two is floored, not rounded: loka's MX scales always are).
    """
    bits = scale_pow2.float().view(torch.int32)
    exp_field = (bits >> 23) & 0xFF
    # 2**-127 is the one float32 subnormal that is an e8m0 value: exponent field 0
    return torch.where(exp_field == 0, torch.zeros_like(exp_field), exp_field).to(torch.uint8)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 scales of e8m0 codes (255 is NaN)."""
    c = codes.view(torch.uint8).to(torch.int32)
    out = torch.where(c == 0, torch.full_like(c, 1 << 22), c << 23).view(torch.float32)  # code 0: 2**-127
    return torch.where(c == 255, torch.full_like(out, math.nan), out)


def as_e8m0(scale_pow2: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales as a torch.float8_e8m0fnu tensor (what MX kernels take)."""
    return e8m0_codes(scale_pow2).view(torch.float8_e8m0fnu)
