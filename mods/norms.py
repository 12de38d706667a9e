"""Which modules are normalizations, and the math mods need from them.

Mods find blocks by pattern (Norm -> Linear, Linear -> Norm), so they must
know which modules normalize and how: a LayerNorm subtracts the mean and
divides by the standard deviation, an RMSNorm only divides by the RMS. Both
then apply an optional per-channel affine ``w * n + b`` over the last dim,
which is where scale migration (``loka.mods.scale_migration``) hides its
per-channel scales. User norms register here with the kind they compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORM_KINDS: dict[type, str] = {nn.LayerNorm: "layernorm"}
if hasattr(nn, "RMSNorm"):
    NORM_KINDS[nn.RMSNorm] = "rmsnorm"
KINDS = ("layernorm", "rmsnorm")


def register_norm(cls: type, kind: str) -> None:
    """Declare a user norm class as ``"layernorm"`` or ``"rmsnorm"``.

    The class must keep the affine weight (and bias, for LayerNorm) as
    ``weight`` / ``bias`` of shape [C] and expose ``normalized_shape`` and ``eps``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a norm kind loka knows; use one of {list(KINDS)}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_norm needs an nn.Module subclass, got {cls!r}")
    NORM_KINDS[cls] = kind


def norm_kind(module: nn.Module) -> str | None:
    """``"layernorm"``, ``"rmsnorm"`` or None when ``module`` is not a known norm."""
    for cls in type(module).__mro__:
        if cls in NORM_KINDS:
            return NORM_KINDS[cls]
    return None


@dataclass(frozen=True)
class NormInfo:
    """What a mod needs to know about one norm module."""

    kind: str
    channels: int  # size of the (single) normalized last dim
    eps: float
    affine: bool  # has a per-channel weight
    has_bias: bool


def norm_info(module: nn.Module) -> tuple[NormInfo | None, str]:
    """(info, "") for a norm over the last dim only, else (None, why not)."""
    kind = norm_kind(module)
    if kind is None:
        return None, f"{type(module).__name__} is not a registered norm"
    shape = tuple(getattr(module, "normalized_shape", ()) or ())
    if len(shape) != 1:
        return None, f"normalizes over {len(shape)} dims {shape}; mods need a norm over the last dim only"
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = getattr(module, "eps", None)
    if eps is None:  # nn.RMSNorm(eps=None) uses the dtype's machine epsilon
        eps = torch.finfo(weight.dtype if weight is not None else torch.float32).eps
    info = NormInfo(kind, int(shape[0]), float(eps), weight is not None, bias is not None)
    return info, ""
