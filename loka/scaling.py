"""Delayed and static scale state for one module's FP8 operands.

Dynamic scaling needs no state: the scale comes from the tensor being cast.
Delayed scaling (Transformer Engine's default) scales by the amax *history*
of earlier steps, so the cast needs no reduction over the current tensor
before it; static scaling uses a scale calibrated offline (for serving).

Both keep **one amax per tensor** (per GEMM and operand role): rows of
activations and gradients change every step, so per-row history has no
meaning. With a finer granularity the delayed/static scale is shared by all
groups of that operand (documented behaviour, not an approximation of ours:
there is nothing per group to remember).

State lives in non-persistent buffers so a module's ``state_dict`` stays
identical to ``nn.Linear``'s; a checkpoint therefore does not carry amax
histories (they refill within ``history_len`` steps) and static scales come
from the plan or calibration, not from the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loka.quantize import group_amax, scale_from_amax
from loka.recipe import GEMM_ROLES, GEMMS, OperandRecipe, Recipe


def state_key(gemm: str, role: str) -> str:
    return f"{gemm}_{role}"


class ScaleState(nn.Module):
    """amax histories (delayed) and calibrated scales (static) for a site's operands."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self._ops: dict[str, OperandRecipe] = {}
        self._static_ready: set[str] = set()
        for gemm in GEMMS:
            g = recipe.gemm(gemm)
            if g.is_hp:
                continue
            for role, op in zip(GEMM_ROLES[gemm], (g.a, g.b)):
                key = state_key(gemm, role)
                if op.scaling == "delayed":
                    self.register_buffer(f"amax_history_{key}", torch.zeros(op.history_len), persistent=False)
                elif op.scaling == "static":
                    self.register_buffer(f"static_scale_{key}", torch.tensor(math.nan), persistent=False)
                else:
                    continue
                self._ops[key] = op

    def keys(self) -> list[str]:
        return list(self._ops)

    def scale_for(self, gemm: str, role: str, x: torch.Tensor) -> torch.Tensor | None:
        """The precomputed scale for ``x`` (None for dynamic scaling). Updates delayed history."""
        key = state_key(gemm, role)
        op = self._ops.get(key)
        if op is None:
            return None
        if op.scaling == "static":
            if key not in self._static_ready:
                raise RuntimeError(
                    f"static scaling of {role} in {gemm} has no calibrated scale; call "
                    f"set_static_scale({role!r}, value) on the module or plan with a probe report"
                )
            return getattr(self, f"static_scale_{key}")
        return self._delayed_scale(key, op, x)

    @torch.no_grad()
    def _delayed_scale(self, key: str, op: OperandRecipe, x: torch.Tensor) -> torch.Tensor:
        history = getattr(self, f"amax_history_{key}")
        amax_now = group_amax(x, "tensorwise").to(history.device)
        past = history.max() if op.history_reduce == "max" else history[0]
        # The first step has no history yet: scale dynamically.
        amax = torch.where(past > 0, past, amax_now)
        history.copy_(torch.roll(history, 1))
        history[0] = amax_now
        return scale_from_amax(amax, op.format, op.pow2)

    @torch.no_grad()
    def set_static_scale(self, role: str, scale: float | torch.Tensor, gemm: str | None = None) -> list[str]:
        """Set the calibrated dequant scale of ``role`` in ``gemm`` (every GEMM using it if None)."""
        set_keys = []
        for g in GEMMS if gemm is None else (gemm,):
            key = state_key(g, role)
            if key in self._ops and self._ops[key].scaling == "static":
                value = float(scale)
                if not math.isfinite(value) or value <= 0:
                    raise ValueError(f"a static scale must be a finite positive number, got {value}")
                getattr(self, f"static_scale_{key}").fill_(value)
                self._static_ready.add(key)
                set_keys.append(key)
        if not set_keys:
            raise ValueError(f"no operand {role!r} uses static scaling in this module's recipe")
        return set_keys
