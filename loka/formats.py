"""FP8 formats: the two OCP float8 encodings loka quantizes to, with their limits.

Every cast, scale and error bound in loka is derived from these numbers, so they
live in one place. ``e4m3`` (torch.float8_e4m3fn) has more precision and a small
range; it is the default for activations and weights. ``e5m2`` has the range of
fp16 with two mantissa bits; it is the default for gradients.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import torch

FormatName = Literal["e4m3", "e5m2"]


@dataclass(frozen=True)
class Float8Format:
    """Limits of one float8 encoding.

    ``max`` is the largest finite value, ``min_normal`` the smallest positive
    normal, ``min_subnormal`` the smallest positive value, ``mantissa_bits`` the
    stored fraction bits, ``emax`` the exponent of ``max``.
    """

    name: FormatName
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int
    emax: int
    has_inf: bool

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

FORMATS: dict[str, Float8Format] = {"e4m3": E4M3, "e5m2": E5M2}
for _f in FORMATS.values():
    _f.rcp_max  # noqa: B018 (fills _RCP_MAX before any trace)


def get_format(name: str | Float8Format) -> Float8Format:
    """Look a format up by name (``"e4m3"`` or ``"e5m2"``)."""
    if isinstance(name, Float8Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown FP8 format {name!r}; use one of {sorted(FORMATS)}"
        ) from None
