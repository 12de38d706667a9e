"""Deprecated: ``loka.convert`` now converts every GEMM on a parameter (``loka.param_gemms``).

``convert_gemms`` remains for one release as an alias; ``param_matmul_operands`` is the
probe's test for the ``x @ W`` calls it captures.
"""

from __future__ import annotations

import re
import warnings
from typing import Mapping

import torch
from torch import nn

from loka.convert import ConvertResult, convert
from loka.nn import Fallback
from loka.recipe import Recipe


_EINSUM = re.compile(r"^([a-zA-Z.]*)([a-zA-Z]),([a-zA-Z])([a-zA-Z])->([a-zA-Z.]*)$")


def _einsum_right(eq: str) -> bool:
    """Whether ``eq`` is ``"<lead>k,kn-><lead>n"`` (x times a [K, N] matrix on its last dim)."""
    m = _EINSUM.match(eq.replace(" ", ""))
    return bool(m) and m.group(2) == m.group(3) and m.group(5) == m.group(1) + m.group(4) and m.group(4) not in m.group(1)


_MATMULS = (torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.matmul, torch.Tensor.mm)


def param_matmul_operands(func, args, kwargs, params: Mapping[int, object]):
    """``(x, W, key)`` when this torch call is ``x @ W`` (or ``einsum("...k,kn->...n", x, W)``) with
    ``W`` a 2-D ``nn.Parameter`` whose ``id`` is in ``params``; else None. Shared by conversion
    and the probe, so both see exactly the same calls."""
    if kwargs:
        return None
    if func in _MATMULS and len(args) == 2:
        x, w = args
    elif func is torch.einsum and len(args) >= 2 and isinstance(args[0], str) and _einsum_right(args[0]):
        ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if len(ops) != 2:
            return None
        x, w = ops
    else:
        return None
    if not isinstance(w, nn.Parameter) or w.dim() != 2 or id(w) not in params:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != w.shape[0]:
        return None
    return x, w, params[id(w)]


def convert_gemms(
    model: nn.Module,
    census=None,
    recipe: Recipe | str = "tensorwise",
    *,
    kernels: str | Mapping[str, str] = "auto",
    fallback: Fallback = "hp",
    only_worth: bool = True,
    example=None,
) -> ConvertResult:
    """Deprecated (kept for one release): ``loka.convert`` converts every GEMM on a parameter now.

    With a ``census`` and ``only_worth``, sites the census finds not worth converting (below its
    ``min_share``) are left out, with the census' reason, as before.
    """
    warnings.warn("loka.convert_gemms.convert_gemms is loka.convert now (every GEMM on a parameter, whatever its "
                  "form); it will be removed in the next release", DeprecationWarning, stacklevel=2)
    why_not = {}
    if census is not None and only_worth:
        why_not = {r["site"]: r["reason"] for r in census.summary()["sites"] if not r["worth_converting"]}
    result = convert(model, recipe, kernels=kernels, fallback=fallback, example=example,
                     module_filter_fn=lambda module, fqn: fqn not in why_not)
    for site, why in why_not.items():
        if result.skipped.get(site) == "excluded by module_filter_fn":
            result.skipped[site] = why
    return result


__all__ = ["convert_gemms", "param_matmul_operands"]
