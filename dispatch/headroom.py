"""FP8 headroom: how much faster can FP8 make this model's training step, at most, and where from.

A model owner's first question, before a week of work. From a census of every GEMM of one step
(``loka.dispatch.headroom_census``) and the speed model of the target GPU
(``loka.kernels.costmodel``), each GEMM is priced in bf16 and on the fastest FP8 ``scaled_mm``
recipe, taken only where it is faster (no accuracy limit: an upper bound), in three regimes:

- **per_call**: every FP8 operand cast per call by a compiled cast pass;
- **producers**: as loka implements them: the sites given in ``producers`` (``norm_quant``: a
  norm feeds fprop's input in FP8, rowwise; ``compiled_cast``: fprop and dgrad, where proven;
  ``loka.dispatch.producer_pricing.PRODUCER_GEMMS``), weights still cast per call;
- **prequantized**: every operand already FP8 (the fastest FP8 GEMMs can be).

Where each figure comes from: a GEMM whose shape lies inside the device's measured region
(``costmodel.CALIBRATED_REGIONS``) is *calibrated*; outside, *extrapolated*. A bound is a band:
its low end counts only calibrated gains, its high end also the extrapolated ones; a point only
when nothing was extrapolated. The step around the GEMMs: attention at ``attention_efficiency``
of the bf16 peak, bmm GEMMs (kept bf16), checkpoint recompute, the optimizer and embedding update
and elementwise work at the device's bandwidth (a model), or the measured bf16 step when given.
``serving=True`` prices a forward instead: fprop only, FP8 weights frozen once, no update.

Step speed-up (Amdahl): S = step / (step - saved). The "GEMM + attention" bound sets every other
cost to zero: no step can beat it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from loka.dispatch.headroom_census import GemmSite, StepCensus
from loka.dispatch.plans import PRODUCERS, Plan
from loka.dispatch.producer_pricing import producer_feeds
from loka.kernels.costmodel import DeviceModel, bf16_us, is_extrapolated, kernel_us
from loka.recipe import GEMMS, gemm_shape

REGIMES = ("per_call", "producers", "prequantized")
ALL_PRODUCERS = "all_producers"  # every site's fprop and dgrad fed by a producer (what would pay)
RECIPES = ("tensorwise", "rowwise")
ADAMW_BYTES = 28  # per fp32 parameter: read param, grad, two states (16), write param and states (12)
EMBEDDING_FWD_BYTES, EMBEDDING_BWD_BYTES = 2, 7  # x element size: gather; sparse grad, coalesce, row update


@dataclass(frozen=True)
class HeadroomOptions:
    """What the estimate assumes. ``producers``: ``{site fqn: producer}`` loka implements on the model."""

    attention_efficiency: float = 1.0
    producers: Mapping[str, str] = field(default_factory=dict)
    min_width: int = 0  # FP8 only at sites with K, N >= min_width (0: wherever the model says it wins)
    recompute: bool = True  # price the forward that checkpointing runs again
    serving: bool = False  # a forward only (fprop), FP8 weights frozen once (loka.weight_cache)
    bf16_step_ms: float | None = None  # the measured bf16 step, replaces the modelled one
    step_source: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.attention_efficiency <= 1:
            raise ValueError(f"attention_efficiency={self.attention_efficiency} must be in (0, 1], "
                             "the fraction of the bf16 GEMM peak attention reaches (e.g. 0.3)")
        bad = {f: p for f, p in dict(self.producers).items() if p not in PRODUCERS}
        if bad:
            raise ValueError(f"producers has unknown values {bad}; use one of {list(PRODUCERS)}")
        if self.min_width < 0:
            raise ValueError(f"min_width={self.min_width} must be >= 0 (0: no width limit)")
        if self.bf16_step_ms is not None:
            if not (math.isfinite(self.bf16_step_ms) and self.bf16_step_ms > 0):
                raise ValueError(f"bf16_step_ms={self.bf16_step_ms} must be a finite time > 0 (ms)")
            if not self.step_source.strip():
                raise ValueError("step_source must say where the measured bf16 step comes from (device, command, date)")


@dataclass(frozen=True)
class GemmPrice:
    """One GEMM of one site in one regime: µs in bf16 and at its best (FP8 where faster), per step."""

    site: GemmSite
    gemm: str
    bf16_us: float
    best_us: float
    recipe: str | None  # the FP8 recipe taken, None: bf16
    extrapolated: bool

    @property
    def saved_us(self) -> float:
        return self.bf16_us - self.best_us


def _fed(regime: str, producer: str | None, recipe: str, gemm: str) -> bool:
    if regime == "prequantized" or (regime == ALL_PRODUCERS and gemm in ("fprop", "dgrad")):
        return True
    return regime == "producers" and producer is not None and producer_feeds(producer, recipe, gemm, "scaled_mm")


def price_gemm(site: GemmSite, gemm: str, regime: str, dev: DeviceModel, opts: HeadroomOptions) -> GemmPrice:
    """bf16 vs the fastest FP8 recipe for ``gemm`` of ``site`` (x2 for a recomputed fprop)."""
    # a bmm's batch priced as one GEMM of batch·M rows: the same FLOPs and bytes, one launch
    shape = gemm_shape(gemm, site.m * site.batch, site.k, site.n)
    reps = 2 if gemm == "fprop" and site.recomputed and opts.recompute and not opts.serving else 1
    b = bf16_us(*shape, dev)
    best, recipe = b, None
    if site.kind == "linear" and min(site.k, site.n) >= opts.min_width:
        producer = dict(opts.producers).get(site.fqn)
        for r in RECIPES:
            t = kernel_us("scaled_mm", r, gemm, *shape, dev, a_in_producer=_fed(regime, producer, r, gemm),
                          b_cached=regime == "prequantized" or opts.serving)
            if t < best:
                best, recipe = t, r
    extrapolated = recipe is not None and (is_extrapolated(dev, "scaled_mm", *shape) or is_extrapolated(dev, "bf16", *shape))
    return GemmPrice(site, gemm, reps * b, reps * best, recipe, extrapolated)


def price_regime(census: StepCensus, regime: str, dev: DeviceModel, opts: HeadroomOptions) -> list[GemmPrice]:
    gemms = ("fprop",) if opts.serving else GEMMS
    return [price_gemm(s, g, regime, dev, opts) for s in census.sites for g in gemms]


@dataclass(frozen=True)
class Band:
    """A figure with its range: ``low`` counts calibrated gains only, ``high`` extrapolated ones too."""

    low: float
    high: float

    @property
    def is_point(self) -> bool:
        return math.isclose(self.low, self.high, rel_tol=1e-9)

    def text(self, fmt: str = "{:.3f}x") -> str:
        return fmt.format(self.low) if self.is_point else f"{fmt.format(self.low)}-{fmt.format(self.high)}"


def speedup(total_ms: float, saved: Band) -> Band:
    """Amdahl: a step of ``total_ms`` that saves ``saved`` ms."""
    return Band(total_ms / (total_ms - saved.low), total_ms / (total_ms - saved.high))


def saved_ms(prices: list[GemmPrice]) -> Band:
    high = sum(p.saved_us for p in prices) / 1e3
    return Band(high - sum(p.saved_us for p in prices if p.extrapolated) / 1e3, high)


def step_parts_ms(census: StepCensus, dev: DeviceModel, opts: HeadroomOptions) -> dict[str, float]:
    """bf16 time of each part of the step (ms, a model at the device's peaks): GEMMs, bmm, attention, rest."""
    prices = price_regime(census, "per_call", dev, opts)
    gemm = sum(p.bf16_us for p in prices if p.site.kind == "linear") / 1e3
    bmm = sum(p.bf16_us for p in prices if p.site.kind == "bmm") / 1e3
    passes = 3 + (1 if census.attention_recomputed and opts.recompute else 0)  # fwd + 2x bwd (+ recompute)
    step = 3  # the backward's elementwise work ~ twice the forward's bytes
    if opts.serving:
        passes = step = 1
    attention = passes * census.attention_fwd_flops / (dev.bf16_tflops * opts.attention_efficiency * 1e9)
    bw = dev.hbm_tbps * 1e9  # bytes per ms
    emb = census.embedding_lookups * census.embedding_dim * census.embedding_bytes
    return {"gemm": gemm, "bmm": bmm, "attention": attention,
            "optimizer": 0.0 if opts.serving else ADAMW_BYTES * census.dense_params / bw,
            "embedding": (EMBEDDING_FWD_BYTES + (0 if opts.serving else EMBEDDING_BWD_BYTES)) * emb / bw,
            "elementwise": step * census.elementwise_fwd_bytes / bw,
            "elementwise_fused": step * census.fused_fwd_bytes / bw}


def _band(b: Band) -> dict:
    return {"low": b.low, "high": b.high}


def _by_arch(prices: list[GemmPrice]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in prices:
        a = out.setdefault(p.site.arch, {"bf16_ms": 0.0, "saved_low_ms": 0.0, "saved_high_ms": 0.0})
        a["bf16_ms"] += p.bf16_us / 1e3
        a["saved_high_ms"] += p.saved_us / 1e3
        a["saved_low_ms"] += 0.0 if p.extrapolated else p.saved_us / 1e3
    return dict(sorted(out.items()))


def regime_summary(prices: list[GemmPrice], core_ms: float, step_ms: float) -> dict:
    """Saved ms, the GEMM + attention bound and the step speed-up (bands), FP8 GEMM counts, per arch."""
    saved = saved_ms(prices)
    return {"saved_ms": _band(saved), "bound": _band(speedup(core_ms, saved)), "step": _band(speedup(step_ms, saved)),
            "fp8_gemms": sum(p.recipe is not None for p in prices),
            "extrapolated_gemms": sum(p.extrapolated for p in prices), "gemms": len(prices),
            "by_arch": _by_arch(prices)}


def plan_fp8_gemms(plan: Plan) -> set[tuple[str, str]]:
    """(fqn, gemm) of every GEMM ``plan`` runs in FP8."""
    return {(s.fqn, g) for s in plan.sites for g, c in s.gemms.items() if c.is_fp8}


def captured(prices: list[GemmPrice], plan: Plan, bound_saved: Band) -> dict:
    """What ``plan`` takes of the producers regime's saving: ms and share of the bound (bands). Each GEMM
    the plan runs in FP8 is priced as the headroom prices it (its best recipe at the census's shape)."""
    chosen = plan_fp8_gemms(plan)
    mine = [p for p in prices if (p.site.fqn, p.gemm) in chosen]
    saved = saved_ms(mine)
    share = Band(saved.low / bound_saved.low if bound_saved.low > 0 else 0.0,
                 saved.high / bound_saved.high if bound_saved.high > 0 else 0.0)
    return {"saved_ms": _band(saved), "share_of_bound": _band(share), "plan_fp8_gemms": len(chosen),
            "sites_not_in_census": sorted({f for f, _ in chosen} - {p.site.fqn for p in prices})}
