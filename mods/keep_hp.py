"""Mod 6: the keep-in-high-precision policy: which Linears stay bf16 by default, and why.

Three kinds of sites rarely gain from FP8 and are where its error costs most:

- the **first projection of raw dense features**: its input is the model's
  float input (counts, prices, after at most elementwise transforms), with
  heavy tails no per-tensor or per-row scale fits; found on the recorded
  dataflow as a Linear whose input is computed from float model inputs only
  (not through an embedding, Linear or norm);
- the **final task heads**: Linears whose output reaches no other Linear
  (logits go straight into the loss, so their error is the model's error);
- **tiny GEMMs**: K or N below ``min_dim``: FP8 cannot be faster there
  (bench/results/h100_2026-11-22_gemm.md: no win below K, N ≈ 512) and the cast costs more than the GEMM.

:func:`keep_in_hp` returns ``{fqn: reason}``; :func:`module_filter_fn` wraps it
for ``loka.convert(module_filter_fn=...)``, and the planner can read the
reasons into its plan. Nothing is changed in the model.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from loka.mods.graph import Dataflow, record
from loka.mods.result import ModResult
from loka.mods.spec import ModSpec

NAME = "keep_hp"
EXACT = True
DEFAULT_MIN_DIM = 32


def keep_in_hp(model: nn.Module, *, sample, min_dim: int = DEFAULT_MIN_DIM, raw_inputs: bool = True,
               heads: bool = True, flow: Dataflow | None = None) -> dict[str, str]:
    """{fqn: reason} for every Linear the policy keeps in bf16 (see module doc)."""
    if min_dim < 0:
        raise ValueError(f"min_dim={min_dim} must be >= 0 (0 disables the tiny-GEMM rule)")
    flow = flow or record(model, sample)
    linear_calls = [c for c in flow.calls if c.kind == "linear"]
    linear_inputs = {c.input for c in linear_calls}
    reasons: dict[str, list[str]] = {}
    for c in linear_calls:
        why = reasons.setdefault(c.fqn, [])
        if raw_inputs and c.input in flow.raw:
            why.append("first projection of raw dense features (heavy-tailed model input)")
        if heads and not flow.reaches(c.output, linear_inputs - {c.input}):
            why.append("final task head (output reaches no other GEMM: its error is the model's)")
        k, n = c.in_shape[-1], c.out_shape[-1]
        if min(k, n) < min_dim:
            why.append(f"tiny GEMM (K={k}, N={n}; min(K, N) < {min_dim}): FP8 cannot win here")
    return {fqn: "; ".join(dict.fromkeys(w)) for fqn, w in reasons.items() if w}


def module_filter_fn(policy: dict[str, str]) -> Callable[[nn.Module, str], bool]:
    """A ``loka.convert`` filter that converts every Linear except those in ``policy``."""
    keep = dict(policy)

    def convert_it(module: nn.Module, fqn: str) -> bool:
        return fqn not in keep

    return convert_it


def apply(model: nn.Module, report=None, *, sample, min_dim: int = DEFAULT_MIN_DIM, flow: Dataflow | None = None) -> ModResult:
    """The policy as a ModResult (no change to the model; ``data["policy"]`` is the {fqn: reason} map)."""
    policy = keep_in_hp(model, sample=sample, min_dim=min_dim, flow=flow)
    advice = tuple((fqn, f"keep bf16: {why}") for fqn, why in policy.items())
    return ModResult(NAME, EXACT, "sites kept in bf16 by default (model unchanged)", (), (), {"policy": policy}, advice)


MOD = ModSpec(
    name=NAME,
    order=70,
    exact="no change",
    pattern="`{fqn: reason}` for sites kept bf16: raw dense input, task heads, tiny GEMMs",
    apply=apply,
)
