"""What to change to buy more FP8 speed: the levers of a headroom estimate, largest modelled gain first.

- **producers**: GEMMs that would pay if their ``a`` operand arrived in FP8 from the op producing it
  (the gain over the producers loka has on this model), and whether loka has that producer;
- **widths**: sites whose K, N sit below the device's FP8 crossover, and the width that would cross;
- **non-GEMM work**: what compile fusion would remove of the eager elementwise passes, and the
  optimizer + embedding update floor FP8 does not touch;
- **accuracy budget**: GEMMs the plan keeps in bf16 for their error, and what they would save.

Gains are ms of the bf16 step, from the speed model (bands where extrapolated).
"""

from __future__ import annotations

import re

from loka.dispatch.headroom import ALL_PRODUCERS, GemmPrice, HeadroomOptions, price_gemm, saved_ms
from loka.dispatch.headroom_census import GemmSite, StepCensus
from loka.dispatch.plans import Plan
from loka.kernels.costmodel import DeviceModel

WIDTHS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 16384)
SPEED_REASONS = ("no FP8 kernel faster", "no timings", "kept bf16 by policy")


def _group(fqn: str) -> str:
    """``interaction.layers.3.fmb.mlp.out`` -> ``interaction.layers.N.fmb.mlp.out`` (repeated blocks as one)."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", fqn)


def _lever(kind: str, what: str, prices: list[GemmPrice] | None, detail: str, loka_has: str,
           gain: tuple[float, float] | None = None) -> dict:
    if gain is None:
        band = saved_ms(prices or [])
        gain = (band.low, band.high)
    return {"lever": kind, "what": what, "gain_ms": {"low": gain[0], "high": gain[1]}, "detail": detail,
            "loka_has": loka_has}


def producer_levers(census: StepCensus, dev: DeviceModel, opts: HeadroomOptions, prices: dict) -> list[dict]:
    """Per site group and GEMM: what a producer would add over the producers loka has here."""
    have = {(p.site.fqn, p.gemm): p for p in prices["producers"]}
    groups: dict[tuple[str, str], list[GemmPrice]] = {}
    for p in prices[ALL_PRODUCERS]:
        now = have[(p.site.fqn, p.gemm)]
        if p.saved_us > now.saved_us:
            extra = GemmPrice(p.site, p.gemm, now.best_us, p.best_us, p.recipe, p.extrapolated)
            groups.setdefault((_group(p.site.fqn), p.gemm), []).append(extra)
    out = []
    for (group, gemm), ps in groups.items():
        s = ps[0].site
        has = ("compiled_cast: implemented; prove it fuses here (loka.dispatch.compiled_casts, train=True)"
               if gemm in ("fprop", "dgrad") else "none")
        if gemm == "fprop" and dict(opts.producers).get(s.fqn) == "norm_quant":
            has = "norm_quant feeds rowwise only; a tensorwise producer would add this"
        out.append(_lever("producer", f"{gemm} of {group} ({len(ps)} call(s), M={s.m} K={s.k} N={s.n})", ps,
                          f"{gemm}'s {'input' if gemm == 'fprop' else 'grad_output'} in FP8 from the op producing it",
                          has))
    return out


def crossover_width(m: int, dev: DeviceModel, regime: str, opts: HeadroomOptions) -> int | None:
    """The smallest K = N (of WIDTHS) at which FP8 fprop beats bf16 at ``m`` rows in ``regime``, or None."""
    for w in WIDTHS:
        if price_gemm(GemmSite("width", m, w, w), "fprop", regime, dev, opts).recipe is not None:
            return w
    return None


def width_levers(census: StepCensus, dev: DeviceModel, opts: HeadroomOptions, prices: dict) -> list[dict]:
    """Site groups where FP8 loses even pre-quantized: the width that would cross, and their bf16 time."""
    pre = {(p.site.fqn, p.gemm): p for p in prices["prequantized"]}
    groups: dict[str, list[GemmPrice]] = {}
    for p in prices["per_call"]:
        if p.site.kind == "linear" and pre[(p.site.fqn, p.gemm)].recipe is None:
            groups.setdefault(_group(p.site.fqn), []).append(p)
    out = []
    for group, ps in groups.items():
        s = ps[0].site
        cross = crossover_width(s.m, dev, "prequantized", opts)
        cross_pc = crossover_width(s.m, dev, "per_call", opts)
        bf16 = sum(p.bf16_us for p in ps) / 1e3
        gain = 0.0
        if cross is not None:  # the same FLOPs at the crossing width, at its modelled FP8 ratio
            at = price_gemm(GemmSite("width", s.m, cross, cross), "fprop", "prequantized", dev, opts)
            gain = bf16 * (1 - at.best_us / at.bf16_us)
        out.append(_lever("width", f"{group} (M={s.m}, K={s.k}, N={s.n}): {len(ps)} GEMM(s) below the FP8 crossover",
                          None, f"{bf16:.3g} ms bf16; FP8 crosses at K=N={cross or '>16384'} pre-quantized, "
                          f"{cross_pc or '>16384'} with per-call casts (model; gain: these FLOPs at that width)",
                          "co-design: widen or merge the layers (loka.mods.horizontal_fusion merges shared-input Linears)",
                          (0.0, gain)))
    return out


def step_levers(parts: dict[str, float]) -> list[dict]:
    """Non-GEMM work: what compile fusion removes of the elementwise passes; the update floor."""
    fusion = max(parts["elementwise"] - parts["elementwise_fused"], 0.0)
    floor = parts["optimizer"] + parts["embedding"]
    return [
        _lever("fusion", "eager elementwise passes (norms, activations, casts)", None,
               f"{parts['elementwise']:.3g} ms at full bandwidth eager; fused to one read/write per GEMM operand "
               f"{parts['elementwise_fused']:.3g} ms (model; a step already compiled has taken part of it)",
               "torch.compile (loka's kernels compile)", (fusion, fusion)),
        _lever("update floor", "optimizer and embedding update", None,
               f"{parts['optimizer']:.3g} ms AdamW + {parts['embedding']:.3g} ms embedding gather/update at full "
               "bandwidth: FP8 does not speed them up (FP8 optimizer states would)", "no", (0.0, 0.0))
        | {"floor_ms": floor},
    ]


def budget_levers(prices: dict, plan: Plan | None) -> list[dict]:
    """GEMMs the plan keeps in bf16 for accuracy, and what they would save in the producers regime."""
    if plan is None:
        return []
    kept = {(s.fqn, g) for s in plan.sites for g, c in s.gemms.items()
            if not c.is_fp8 and c.reason and not any(r in c.reason for r in SPEED_REASONS)}
    ps = [p for p in prices["producers"] if (p.site.fqn, p.gemm) in kept and p.recipe is not None]
    if not ps:
        return []
    return [_lever("accuracy", f"{len(kept)} GEMM(s) the plan keeps in bf16 for their error", ps,
                   "FP8 would pay there; a Mod that lowers their error (loka mods) or a looser budget buys it",
                   "loka mods (scale migration, row scales, keep_hp)")]


def levers(census: StepCensus, dev: DeviceModel, opts: HeadroomOptions, prices: dict, parts: dict,
           step_ms: float, plan: Plan | None) -> list[dict]:
    """Every lever, largest high-end gain first; each with its step share."""
    out = (producer_levers(census, dev, opts, prices) + width_levers(census, dev, opts, prices)
           + step_levers(parts) + budget_levers(prices, plan))
    for lv in out:
        lv["step_share"] = lv["gain_ms"]["high"] / step_ms if step_ms > 0 else 0.0
    return sorted(out, key=lambda lv: -lv["gain_ms"]["high"])
