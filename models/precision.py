"""Precision of the ranker's GEMM sites: ``bf16`` (default), ``fp8``, or a loka plan file.

- ``bf16``: no conversion; the trainer autocasts to bf16 where the device supports it.
- ``fp8``: every Linear through `loka.Float8Linear` via ``loka.convert.convert(model, recipe="tensorwise")``,
  the naive convert-everything baseline.
- a path to a plan JSON: ``loka.dispatch.load_plan(path)`` then ``loka.dispatch.apply_plan(model, plan)``,
  each site with its planned kernel (or kept in bf16).

Conversion reuses the model's Parameters and keeps nn.Linear's state_dict keys, so a bf16
checkpoint loads into the converted model and back.
"""

from __future__ import annotations

import os

from torch import nn

from loka.convert import convert
from loka.dispatch import apply_plan, load_plan

HP_PRECISIONS = ("bf16", "fp32")


def check_precision(precision: str) -> None:
    """Raise ValueError unless ``precision`` is bf16, fp32, fp8 or an existing plan file."""
    if precision in HP_PRECISIONS or precision == "fp8":
        return
    if not precision.endswith(".json") and not os.path.exists(precision):
        raise ValueError(f"precision={precision!r} is not 'bf16', 'fp32', 'fp8' or a plan file path; "
                         "pass one of those (plans are written by `loka plan`).")
    if not os.path.isfile(precision):
        raise ValueError(f"plan file {precision!r} does not exist; write it with `loka plan` first.")


def apply_precision(model: nn.Module, precision: str, compile: bool | None = None):
    """Convert ``model`` in place for ``precision``; returns loka's ConvertResult or None (hp).

    ``compile``: whether the model will run under torch.compile (``False`` warns about a plan's
    ``compiled_cast`` sites, whose casts then run unfused; ``None``: not said).
    """
    check_precision(precision)
    if precision in HP_PRECISIONS:
        return None
    if precision == "fp8":
        return convert(model, recipe="tensorwise")
    return apply_plan(model, load_plan(precision), compile=compile)
