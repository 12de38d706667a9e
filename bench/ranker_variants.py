"""The precisions bench/ranker.py compares, each built from the same bf16 ranker.

A variant turns a fresh copy of the base model into the model to train and serve, and
says how to run its forward:

- ``bf16``: no conversion (bf16 autocast on GPU), torch.compile'd;
- ``torchao-tensorwise`` / ``torchao-rowwise``: naive FP8, every Linear whose dims
  ``torch._scaled_mm`` takes (multiples of 16) converted by
  ``torchao.float8.convert_to_float8_training`` with
  ``Float8LinearConfig.from_recipe_name(...)``, torch.compile'd;
- ``te``: Transformer Engine, each such Linear swapped for ``te.Linear`` (same
  weights) and run under ``te.fp8_autocast`` (current scaling when TE has it, else
  delayed); eager, because TE's delayed scaling does not run under torch.compile;
- ``loka-plan``: ``loka.convert(model, plan=plan)``, torch.compile'd.

A variant that cannot run here raises :class:`Unavailable` with the reason, which the
table prints by name (``te: not installed ...``); nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

VARIANTS = ("bf16", "torchao-tensorwise", "torchao-rowwise", "te", "loka-plan")


class Unavailable(RuntimeError):
    """This variant cannot run on this machine; the message says why."""


@dataclass
class Built:
    """A converted model, how many Linear sites run FP8, and how to run it."""

    model: nn.Module
    fp8_sites: int
    linear_sites: int
    compile: bool = True
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    notes: list[str] = field(default_factory=list)

    def sites_cell(self) -> str:
        return f"{self.fp8_sites}/{self.linear_sites}"


def _scaled_mm_dims(module: nn.Module, _fqn: str = "") -> bool:
    """Dims torch._scaled_mm (and TE) take: K and N multiples of 16."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _n_linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def build_bf16(model: nn.Module, **_) -> Built:
    return Built(model, 0, _n_linears(model))


def _build_torchao(recipe: str) -> Callable[..., Built]:
    def build(model: nn.Module, **_) -> Built:
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError as exc:
            if getattr(exc, "name", None) == "torchao":
                raise Unavailable("torchao: not installed (pip install torchao)") from None
            raise Unavailable(f"torchao: float8 training not importable ({exc})") from None
        n = _n_linears(model)
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                   module_filter_fn=_scaled_mm_dims)
        fp8 = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        return Built(model, fp8, n, notes=[
            f"Float8LinearConfig.from_recipe_name({recipe!r}); {n - fp8} Linears with K or N not a multiple "
            "of 16 kept bf16"])
    return build


def _te_recipe():
    from transformer_engine.common import recipe as te_recipe

    if hasattr(te_recipe, "Float8CurrentScaling"):
        return te_recipe.Float8CurrentScaling(), "Float8CurrentScaling"
    return te_recipe.DelayedScaling(), "DelayedScaling"


def build_te(model: nn.Module, *, device: torch.device, **_) -> Built:
    from loka.kernels.backend_te import te_import

    ok, why = te_import()
    if not ok:
        raise Unavailable(why)
    if device.type != "cuda":
        raise Unavailable("te: needs a CUDA device")
    import transformer_engine.pytorch as te

    n, swapped = _n_linears(model), 0
    for _fqn, parent, name, lin in _linears(model):
        if not _scaled_mm_dims(lin):
            continue
        new = te.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        params_dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        setattr(parent, name, new)
        swapped += 1
    fp8_recipe, recipe_name = _te_recipe()
    ctx = lambda: te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)  # noqa: E731
    return Built(model, swapped, n, compile=False, forward_context=ctx,
                 notes=[f"te.Linear under fp8_autocast({recipe_name}), eager (not compiled)"])


def _linears(model: nn.Module):
    """(fqn, parent, attribute, linear) for every nn.Linear, collected before any swap."""
    out = []
    for pfqn, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((f"{pfqn}.{name}" if pfqn else name, parent, name, child))
    return out


def build_loka_plan(model: nn.Module, *, plan, sample=None, **_) -> Built:
    """``loka.convert(model, plan=plan)``, then the plan's producers (fused norm+quantize) on ``sample``."""
    import loka
    from loka.dispatch.producers import apply_producers

    n = _n_linears(model)
    result = loka.convert(model, plan=plan)
    notes = [f"{len(result.skipped)} sites kept bf16 by the plan"] if result.skipped else []
    if any(s.producer == "norm_quant" for s in plan.sites):
        if sample is None:
            raise ValueError("the plan has norm_quant sites: build_loka_plan needs a sample batch to fuse them")
        fused = apply_producers(model, plan, sample)
        notes.append(f"{len(fused.changes)} norm+quantize producers fused"
                     + (f", {len(fused.skipped)} not: {fused.skipped[0][1]}" if fused.skipped else ""))
    return Built(model, len(result.converted), n, notes=notes)


BUILDERS: dict[str, Callable[..., Built]] = {
    "bf16": build_bf16,
    "torchao-tensorwise": _build_torchao("tensorwise"),
    "torchao-rowwise": _build_torchao("rowwise"),
    "te": build_te,
    "loka-plan": build_loka_plan,
}


def library_versions() -> dict[str, str]:
    """torch / triton / torchao / transformer_engine versions, or why one is missing."""
    from loka.kernels.backend_te import te_import, te_version

    out = {"torch": torch.__version__}
    for name in ("triton", "torchao"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # a missing library is a line in the report, not a crash
            out[name] = f"not importable ({type(exc).__name__})"
    out["transformer_engine"] = te_version() or te_import().reason
    return out
