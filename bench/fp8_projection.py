"""How much can FP8 speed up a ranker's training step at all? A speed-model bound, on CPU.

Before a GPU run says whether loka's plan reaches a target (e.g. >= 1.25x of bf16 at `large`),
the committed speed model (loka.kernels.costmodel, fitted to bench/results/gemm_calibration.json)
says whether the target is reachable even if every GEMM were accuracy-safe:

    python bench/fp8_projection.py --size large --batch 8192 --speed-model h200 [--json PATH]

Every Linear of one training step is recorded on fake tensors (its M, K, N; no memory, seconds),
and each of its three GEMMs is priced in bf16 and on the fastest FP8 ``scaled_mm`` recipe,
taken only where it is faster (no accuracy limit: an upper bound), in three regimes:

- **per-call casts**: every FP8 operand cast by a compiled cast pass, weights cast once a step;
- **producers**: fprop's and dgrad's ``a`` operand arrive in FP8 from the op that produced them
  (fused norm+quantize, or a cast torch.compile fused into the producer), weights still cast;
- **ceiling**: both operands pre-quantized (the fastest FP8 GEMM can be).

Attention inside the flash kernel is priced as bf16 at the model's bf16 speed (it stays bf16).
What is NOT in the bound: everything that is not a GEMM (embeddings, norms, the optimizer,
data), which FP8 does not speed up, so the step speed-up is at most the GEMM-only figure, and
lower by the share of the step those take. These are model figures, not measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from loka.kernels.costmodel import DEVICE_MODELS, DeviceModel, bf16_us, kernel_us
from loka.models import RankerConfig
from loka.models.estimate import _attention_flops, shape_batch
from loka.models.history_layout import HistoryLayout
from loka.models.ranker import Ranker
from loka.recipe import GEMMS, gemm_shape

RECIPES = ("tensorwise", "rowwise")
REGIMES = ("per_call", "producers", "ceiling")


@dataclass(frozen=True)
class Site:
    fqn: str
    m: int
    k: int
    n: int


def record_sites(cfg: RankerConfig, batch_size: int, seed: int = 0) -> tuple[list[Site], float]:
    """Every Linear call of one forward at ``batch_size`` on fake tensors, and attention's forward FLOPs."""
    batch = shape_batch(cfg, batch_size, seed)
    layout = (HistoryLayout.jagged_tokens(batch.hist_mask, cfg.seq_summary_tokens, attention="flash-estimate")
              if cfg.history_len else None)
    sites: list[Site] = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Ranker(cfg)
        names = {m: n for n, m in model.named_modules()}

        def hook(module, args, _out):
            x = args[0]
            sites.append(Site(names[module], x.numel() // module.in_features, module.in_features, module.out_features))

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(batch, layout)
        for h in handles:
            h.remove()
    return sites, _attention_flops(cfg, layout)


def gemm_us(gemm: str, m: int, k: int, n: int, dev: DeviceModel, regime: str) -> tuple[float, float]:
    """(bf16 µs, best µs) of one GEMM: FP8 where the model has it faster, else bf16."""
    shape = gemm_shape(gemm, m, k, n)
    bf16 = bf16_us(*shape, dev)
    feeds_a = regime == "ceiling" or (regime == "producers" and gemm in ("fprop", "dgrad"))
    fp8 = min(kernel_us("scaled_mm", r, gemm, *shape, dev, a_in_producer=feeds_a, b_cached=regime == "ceiling")
              for r in RECIPES)
    return bf16, min(bf16, fp8)


def project(sites: list[Site], attention_fwd_flops: float, dev: DeviceModel) -> dict:
    """Per regime: bf16 and best GEMM time (ms per step), and the GEMM-only speed-up."""
    attention_ms = 3 * attention_fwd_flops / (dev.bf16_tflops * 1e9)  # fwd + 2x bwd, at the bf16 peak
    out = {"sites": len(sites), "attention_bf16_ms": attention_ms, "device_model": dev.name, "regimes": {}}
    for regime in REGIMES:
        bf16 = best = 0.0
        fp8_gemms = 0
        by_arch: dict[str, list[float]] = {}
        for s in sites:
            for gemm in GEMMS:
                b, f = gemm_us(gemm, s.m, s.k, s.n, dev, regime)
                bf16, best = bf16 + b, best + f
                fp8_gemms += f < b
                arch = by_arch.setdefault(s.fqn.split(".")[0], [0.0, 0.0])
                arch[0], arch[1] = arch[0] + b, arch[1] + f
        total_bf16 = bf16 / 1e3 + attention_ms
        total_best = best / 1e3 + attention_ms
        out["regimes"][regime] = {
            "gemm_bf16_ms": bf16 / 1e3, "gemm_best_ms": best / 1e3, "fp8_gemms": fp8_gemms,
            "gemm_only_speedup": total_bf16 / total_best,
            "by_arch_ms": {a: {"bf16": v[0] / 1e3, "best": v[1] / 1e3} for a, v in sorted(by_arch.items())}}
    return out


def rest_allowance_ms(r: dict, attention_ms: float, target: float) -> float:
    """The most the rest of the step (not GEMMs or attention) may take for ``target`` x: the step
    speed-up is bf16_step / (bf16_step - saved), so bf16_step <= saved * target / (target - 1)."""
    saved = r["gemm_bf16_ms"] - r["gemm_best_ms"]
    return saved * target / (target - 1) - (r["gemm_bf16_ms"] + attention_ms)


def project_serving(sites: list[Site], attention_fwd_flops: float, dev: DeviceModel) -> dict:
    """Serving (fprop only, FP8 weights frozen once): per ``a`` regime, the GEMMs + attention speed-up bound."""
    attention_ms = attention_fwd_flops / (dev.bf16_tflops * 1e9)
    out = {}
    for regime, fed in (("per_call", False), ("producers", True)):
        bf16 = best = 0.0
        for s in sites:
            b = bf16_us(s.m, s.k, s.n, dev)
            f = min(kernel_us("scaled_mm", r, "fprop", s.m, s.k, s.n, dev, a_in_producer=fed, b_cached=True)
                    for r in RECIPES)
            bf16, best = bf16 + b, best + min(b, f)
        out[regime] = {"gemm_bf16_ms": bf16 / 1e3, "gemm_best_ms": best / 1e3,
                       "speedup": (bf16 / 1e3 + attention_ms) / (best / 1e3 + attention_ms)}
    return out


def render(p: dict, size: str, batch: int, target: float) -> str:
    lines = [f"# FP8 speed-up bound: ranker `{size}`, batch {batch}, speed model {p['device_model']} (not measured)",
             "", f"{p['sites']} Linear calls per forward, x3 GEMMs; attention (flash, bf16) "
                 f"{p['attention_bf16_ms']:.2f} ms at the bf16 peak.", "",
             "| regime | GEMM bf16 ms | GEMM best ms | FP8 GEMMs | GEMMs + attention speed-up (upper bound of the "
             f"step's) | for {target:g}x the rest of the step may take at most |",
             "|---|---|---|---|---|---|"]
    for name, r in p["regimes"].items():
        rest = rest_allowance_ms(r, p["attention_bf16_ms"], target)
        cell = f"{rest:.1f} ms" if rest >= 0 else "unreachable"
        lines.append(f"| {name} | {r['gemm_bf16_ms']:.2f} | {r['gemm_best_ms']:.2f} | {r['fp8_gemms']} of "
                     f"{3 * p['sites']} | {r['gemm_only_speedup']:.3f}x | {cell} |")
    lines += ["", "Per arch (producers regime), ms bf16 -> best:", ""]
    for arch, v in p["regimes"]["producers"]["by_arch_ms"].items():
        lines.append(f"- {arch}: {v['bf16']:.2f} -> {v['best']:.2f}")
    lines += ["", "Everything that is not a GEMM or attention is left out: the step's speed-up is at most "
              "the fifth column, less by the share of the step the rest takes."]
    if "serving" in p:
        sv = p["serving"]
        lines += ["", f"Serving at batch {p['serving_batch']} (fprop only, FP8 weights frozen once), GEMMs + attention: "
                  f"{sv['per_call']['speedup']:.3f}x with the activation cast per call, "
                  f"{sv['producers']['speedup']:.3f}x with it quantized by its producer "
                  f"(GEMM bf16 {sv['per_call']['gemm_bf16_ms']:.2f} ms)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="large", help="tiny | small | base | large (default large)")
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--speed-model", choices=sorted(DEVICE_MODELS), default="h200")
    ap.add_argument("--serve-batch", type=int, default=4096, help="serving batch to bound (default 4096)")
    ap.add_argument("--target", type=float, default=1.25, help="step speed-up to check (default 1.25)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if not args.target > 1.0:
        print(f"bench/fp8_projection.py: --target {args.target} must be > 1 (a speed-up)", file=sys.stderr)
        return 2
    if args.batch < 1 or args.serve_batch < 1:
        print(f"bench/fp8_projection.py: --batch {args.batch} and --serve-batch {args.serve_batch} must be >= 1",
              file=sys.stderr)
        return 2
    try:
        cfg = RankerConfig.from_size(args.size)
    except ValueError as exc:
        print(f"bench/fp8_projection.py: {exc}", file=sys.stderr)
        return 2
    sites, attention = record_sites(cfg, args.batch)
    dev = DEVICE_MODELS[args.speed_model]
    p = project(sites, attention, dev)
    serve_sites, serve_attention = record_sites(cfg, args.serve_batch)
    p.update(serving=project_serving(serve_sites, serve_attention, dev), serving_batch=args.serve_batch)
    print(render(p, args.size, args.batch, args.target))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "batch": args.batch, **p}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
