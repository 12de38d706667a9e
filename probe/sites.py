"""Finding the GEMM sites of a model.

A *site* is one module whose forward is a Linear GEMM ``y = x Wᵀ (+ b)``: every
``nn.Linear`` and every loka GEMM module (``loka.nn.Float8Linear``, or any module
class that sets ``loka_gemm_site = True`` and has a 2-D ``weight`` of shape [N, K]),
and every 1x1 ``nn.Conv1d`` (stride 1, no padding, one group: ``x [B, K, L]`` is the
GEMM ``x[B*L, K] · W[N, K]ᵀ`` with channels first; see :func:`channels_first`).
Sites are named by their fully-qualified name (fqn) in the model and filtered with
fnmatch globs, the same way ``loka.convert``'s ``module_filter_fn`` sees them.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass

from torch import nn


def _loka_gemm_types() -> tuple[type, ...]:
    """loka's own GEMM modules, looked up lazily so the probe works before loka.nn exists."""
    try:
        mod = importlib.import_module("loka.nn")
    except ModuleNotFoundError as exc:
        if exc.name == "loka.nn":
            return ()
        raise
    return tuple(t for t in (getattr(mod, "Float8Linear", None),) if isinstance(t, type))


def channels_first(module: nn.Module) -> bool:
    """A 1x1 ``Conv1d`` GEMM site: its operands have channels (K, N) on dim -2, not last."""
    if not isinstance(module, nn.Conv1d):
        return False
    plain = module.kernel_size == (1,) and module.stride == (1,) and module.groups == 1
    return plain and module.padding in ((0,), "valid")


def is_gemm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a GEMM site (see module docstring)."""
    if isinstance(module, nn.Linear) or isinstance(module, _loka_gemm_types()) or channels_first(module):
        return True
    w = getattr(module, "weight", None)
    return bool(getattr(type(module), "loka_gemm_site", False)) and w is not None and w.dim() == 2


@dataclass(frozen=True)
class Site:
    """One GEMM site: ``y[M, N] = x[M, K] · W[N, K]ᵀ``; M is seen at run time."""

    fqn: str
    module_type: str
    in_features: int  # K
    out_features: int  # N


def _matches(fqn: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def find_sites(
    model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> dict[str, tuple[Site, nn.Module]]:
    """``{fqn: (Site, module)}`` for every GEMM site kept by the include/exclude globs.

    A module reached under several names (shared) is listed once, under its first fqn.
    The root module itself is a site when it is a GEMM module (fqn ``""`` shown as ``"<root>"``).
    """
    out: dict[str, tuple[Site, nn.Module]] = {}
    seen: set[int] = set()
    # MultiheadAttention passes out_proj's weight to its functional form and never calls out_proj:
    # that weight is captured as a parameter GEMM (loka.probe.capture_matmul), not by a module hook.
    unused = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}
    for fqn, module in model.named_modules():
        if id(module) in seen or id(module) in unused or not is_gemm_module(module):
            continue
        name = fqn or "<root>"
        if include and not _matches(name, include):
            continue
        if exclude and _matches(name, exclude):
            continue
        seen.add(id(module))
        n, k = module.weight.shape[:2]  # a 1x1 conv's weight is [N, K, 1]
        out[name] = (Site(name, type(module).__name__, int(k), int(n)), module)
    return out


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``'d one (``OptimizedModule._orig_mod``).

    Hooks are attached to the original module's submodules; a model compiled *after*
    the probe attached sees them (dynamo traces hooks that exist at compile time).
    """
    return getattr(model, "_orig_mod", model)
