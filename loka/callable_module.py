"""A module that is also its main function: ``loka.quantize(x, "e4m3")`` and ``loka.quantize.fake_quantize``.

``loka.quantize``, ``loka.convert`` and ``loka.gate`` name both a module and the one
function most callers want from it. A package attribute can hold only one of them, and
binding the function hid the module (``loka.quantize.fake_quantize`` failed). Instead the
module object itself becomes callable: its class gains a ``__call__`` that is the function,
so every old spelling works (``loka.quantize(...)``, ``from loka.quantize import
quantize``, ``loka.quantize.quantize(...)``) and ``inspect.signature`` shows the function's
signature.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Callable


def make_callable(module_name: str, function: Callable) -> types.ModuleType:
    """Make the imported module ``module_name`` callable as ``function``; returns the module."""
    module = sys.modules[module_name]
    cls = type(f"CallableModule[{module_name}]", (types.ModuleType,), {"__call__": staticmethod(function)})
    module.__class__ = cls
    module.__signature__ = inspect.signature(function)  # else inspect drops the first parameter as `self`
    return module


__all__ = ["make_callable"]
