"""What a producer saves a GEMM: the planner prices FP8 at producer sites without the input's cast.

A site whose fprop input can arrive in FP8 from the op that produces it (``producer``
``"norm_quant"``: the norm emits FP8 + row scales; ``"compiled_cast"``: torch.compile puts
the cast in the producer's kernel, proven on inductor's code) does not pay a separate amax
and cast pass over its activation. A plan made after the GEMMs were chosen would never see
that: FP8 at a ranker-sized site loses to bf16 *with* the cast and wins *without* it
(measured on one H200, 2026-11-30: 8192x1024x1024 scaled_mm 0.29x of bf16 with an eager
cast, 0.85x pre-quantized; 32768x1024x1024 0.12x and 1.44x; ``bench/results/``). So the
planner takes ``producers={fqn: producer}`` up front and charges those candidates the
GEMM without the input's cast:

- modelled timings (``source: "model"``): the speed model's own cast time
  (``loka.kernels.costmodel.quantize_us``, compiled, as the timings were modelled);
- measured timings, when they come from this device: the cast timed here, once per
  (M, K, operand recipe, dtype) with loka's timer (``quantize_operand`` as ``Float8Linear``
  runs it), which is what the unfused path pays;
- measured timings from another device: nothing is subtracted (the cast time there is
  unknown) and a plan note says so; the choice is then conservative.

For a training plan, give ``compiled_cast`` only to sites proven on a training step (their
dgrad is priced without ``dy``'s cast too); a serving proof says nothing about the backward.

Which recipes a producer can feed: ``norm_quant`` writes dynamic rowwise scales (the fused
kernel's layout); a compiled cast takes any per-call (dynamic) scaling. loka's Triton GEMM
casts its activation inside the GEMM, so it gains nothing from a producer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from loka.dispatch.plans import PRODUCERS
from loka.kernels.costmodel import DEVICE_MODELS, quantize_us
from loka.kernels.kernel import OCP_FP8
from loka.kernels.padded import kernel_by_name
from loka.quantize import quantize_operand
from loka.recipe import OperandRecipe, as_recipe
from loka.timer import device_name, time_fn

# The GEMMs whose ``a`` operand each producer quantizes. The fused norm kernel emits fprop's
# input; a compiled cast proven on a training step (prove_compiled_casts(train=True)) also has
# dgrad's ``dy`` cast in the kernel of the backward op that produces it (a site with any
# separate cast kernel is not proven), so both are priced without their cast.
PRODUCER_GEMMS = {"norm_quant": ("fprop",), "compiled_cast": ("fprop", "dgrad")}


def check_producers(producers: Mapping[str, str] | None, site_fqns: set[str]) -> dict[str, str]:
    """``producers`` as a dict, refusing unknown sites and values with the fix."""
    out = dict(producers or {})
    unknown = sorted(set(out) - site_fqns)
    if unknown:
        raise ValueError(f"producers names sites the report does not have: {unknown[:5]}; "
                         "use the fqns of the probed model (loka.dispatch.producers.norm_fed_linears finds them)")
    bad = {f: p for f, p in out.items() if p not in PRODUCERS}
    if bad:
        raise ValueError(f"producers has unknown values {bad}; use one of {list(PRODUCERS)}")
    return out


def producer_feeds(producer: str, recipe: str, gemm: str, kernel: str) -> bool:
    """Whether ``producer`` can hand ``kernel`` the FP8 ``a`` operand of ``gemm`` under ``recipe``."""
    if gemm not in PRODUCER_GEMMS.get(producer, ()) or kernel_by_name(kernel).fuses_a_cast:
        return False
    g = as_recipe(recipe).gemm(gemm)
    if g.is_hp or g.a.scaling != "dynamic":
        return False
    # the fused norm+quantize kernels emit OCP FP8 with row scales only
    return producer == "compiled_cast" or (g.a.granularity == "rowwise" and g.a.format in OCP_FP8)


@dataclass
class CastPricer:
    """The ms a site's ``a``-operand cast costs, as the timings at hand would have charged it."""

    device: torch.device
    dtype: torch.dtype
    measured: dict = field(default_factory=dict)  # (m, k, operand, dtype) -> ms
    unknown_devices: set = field(default_factory=set)

    def cast_ms(self, timings: Mapping, m: int, k: int, operand: OperandRecipe) -> float | None:
        """None when the timings' device is neither modelled nor this one (cast time unknown)."""
        if timings.get("source") == "model":
            dev = next((d for d in DEVICE_MODELS.values() if d.name == timings.get("device_name")), None)
            if dev is None:
                self.unknown_devices.add(str(timings.get("device_name")))
                return None
            return quantize_us(max(m, 1), k, dev, amax_pass=operand.scaling == "dynamic") / 1e3
        if timings.get("device_name") != device_name(self.device):
            self.unknown_devices.add(str(timings.get("device_name")))
            return None
        key = (int(m), int(k), operand, self.dtype)
        if key not in self.measured:
            self.measured[key] = self._time_cast(m, k, operand)
        return self.measured[key]

    def _time_cast(self, m: int, k: int, operand: OperandRecipe) -> float:
        x = torch.randn(max(m, 1), k, device=self.device).to(self.dtype)
        return time_fn(lambda: quantize_operand(x, operand), warmup=3, iters=10, device=self.device).median_ms

    def notes(self, n_sites: int) -> list[str]:
        if not n_sites:
            return []
        out = [f"{n_sites} sites take a GEMM input in FP8 from its producer: their FP8 candidates are "
               "priced without the input's cast"]
        if self.unknown_devices:
            out.append(f"the cast time on {sorted(self.unknown_devices)} is unknown here (timings from another "
                       "device): producer sites there are priced with the cast (conservative)")
        return out
