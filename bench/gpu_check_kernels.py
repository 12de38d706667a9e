"""The kernel table of bench/gpu_check.py: every GEMM at the ranker's own shapes, timed with CUDA graphs.

    python bench/gpu_check_kernels.py --size base --batch 8192 --json kernels.json

Shapes: one forward of the ranker ``--size`` on the meta device (nothing allocated) with a
hook on every ``nn.Linear``; off the CPU the ranker keeps its histories padded, so each
site's rows per example are what a CUDA device executes, scaled to ``--batch`` (every M
grows linearly with the batch). Sites of the same (M, K, N) are one row; the ``--max-shapes``
shapes with the most FLOPs (count x 2MKN) are timed, smallest first, each as fprop, dgrad and
wgrad (at ``base``, batch 8192: four sequence shapes of M = 2,129,920 padded tokens, the
interaction MLP's 8192x1024x1536 and the history input projection).

Per GEMM: ``bf16`` (the hp kernel), every FP8 kernel registered in loka.dispatch that is
available here and takes the recipe at that shape, *with its per-call quantization of both
operands* (``kernel.mm`` on bf16 inputs), and the ceilings: ``torch._scaled_mm`` on operands
quantized beforehand (tensorwise and rowwise e4m3): what FP8 gives if quantization were free.

Timing: loka.timer.time_fn with ``cuda_graph=True``: ``calls`` back-to-back calls captured
in one CUDA graph, each sample one replay, so launch overhead does not hide small kernels
(bf16 at 8192x256x256 took 19 µs per Python call on an H200, 2026-11-30, most of it launch
path). ``calls`` is picked per GEMM so a sample lasts about ``--sample-ms``. A kernel that
cannot be captured falls back to back-to-back calls per event pair and its row says why.
``bf16 (per call)`` is the same bf16 GEMM timed one call per event pair: the gap between
the two is the launch overhead a per-call timer would have reported. L2 is not flushed.

The JSON is rewritten after every GEMM, so a run stopped at its time limit keeps what it
timed. On CPU (``--device cpu``, the smoke mode) every figure is flagged not representative.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from loka.kernels import KERNELS
from loka.models import Ranker, RankerConfig, SyntheticStream
from loka.quantize import quantize
from loka.recipe import GEMMS, HP_GEMM, as_recipe, gemm_shape
from loka.timer import device_name, time_fn, try_time

RECIPES = ("tensorwise", "rowwise", "blockwise", "mx")


def ranker_gemm_sites(size: str, batch: int) -> list[dict]:
    """``[{m, k, n, sites: [fqn], flops}]`` of the ranker's Linears at ``batch``, padded histories."""

    cfg = RankerConfig.from_size(size)
    n_examples = 4
    with torch.device("meta"):
        model = Ranker(cfg)
    sample = SyntheticStream(cfg, n_examples, seed=0, device="cpu").batch(0).to("meta")
    seen: dict[tuple[int, int, int], list[str]] = {}

    def hook(name):
        def record(module, inputs, _out):
            rows = inputs[0].numel() // inputs[0].shape[-1]
            m = rows * batch // n_examples
            seen.setdefault((m, module.in_features, module.out_features), []).append(name)
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    out = [{"m": m, "k": k, "n": n, "sites": names, "flops": 2.0 * m * k * n * len(names)}
           for (m, k, n), names in seen.items()]
    return sorted(out, key=lambda s: -s["flops"])


def _ceilings(a, b, dtype):
    """Pre-quantized ``torch._scaled_mm`` calls (tensorwise, rowwise e4m3), or {} if the dims do not fit."""

    k, n = a.shape[1], b.shape[0]
    if k % 16 or n % 16:
        return {}
    out = {}
    for gran in ("tensorwise", "rowwise"):
        a8, sa = quantize(a, "e4m3", gran)
        b8, sb = quantize(b, "e4m3", gran)
        sb = sb.reshape(1, -1) if gran == "rowwise" else sb
        a8, b8t = a8.contiguous(), b8.contiguous().t()
        out[f"ceiling {gran} (pre-quantized scaled_mm)"] = (
            lambda a8=a8, b8t=b8t, sa=sa, sb=sb: torch._scaled_mm(a8, b8t, scale_a=sa, scale_b=sb, out_dtype=dtype))
    return out


def candidates(a, b, shape, dtype, device, only: set[str] | None = None) -> tuple[dict, dict]:
    """``({label: fn}, {label: reason skipped})`` for one GEMM: bf16, each kernel/recipe, ceilings."""

    bf16 = KERNELS.get("bf16")
    fns = {"bf16": lambda: bf16.mm(a, b, HP_GEMM, out_dtype=dtype)}
    skipped = {}
    for kernel in KERNELS:
        if kernel.hp or kernel.reference:  # the numerical reference, not a kernel to deploy
            continue
        if only is not None and kernel.name not in only:
            skipped[kernel.name] = "not in --kernels"
            continue
        ok = kernel.available(device)
        if not ok:
            skipped[kernel.name] = getattr(ok, "reason", "") or "not available"
            continue
        for rname in RECIPES:
            g = as_recipe(rname).fprop  # e4m3 x e4m3: the same cast cost at every GEMM's shape
            sup = kernel.supports(g, shape, dtype, device)
            if not sup:
                skipped[f"{kernel.name}/{rname}"] = getattr(sup, "reason", "") or "not supported"
                continue
            fns[f"{kernel.name}/{rname}"] = lambda kernel=kernel, g=g: kernel.mm(a, b, g, out_dtype=dtype)
    try:
        fns.update(_ceilings(a, b, dtype))
    except Exception as exc:  # the ceiling is a row with its reason, not the end of the table
        skipped["ceiling"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return fns, skipped


def _calls_for(per_call_ms: float, sample_ms: float, max_calls: int) -> int:
    return max(1, min(max_calls, math.ceil(sample_ms / max(per_call_ms, 1e-4))))


def time_gemm(shape, dtype, device, args) -> dict:
    """One GEMM ``(m, k, n)``: every candidate's per-call time, FLOP rate and ratio to bf16."""

    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(m * 31 + k * 7 + n)  # drawn on the device: M reaches 2M rows
    a = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, k, generator=gen, device=device, dtype=dtype) * 0.05
    only = set(args.kernels.split(",")) if args.kernels else None
    fns, skipped = candidates(a, b, shape, dtype, device, only)
    per_call = time_fn(fns["bf16"], warmup=args.warmup, iters=args.iters, device=device)
    calls = _calls_for(per_call.median_ms, args.sample_ms, args.max_calls)
    entries = [dict(what="bf16 (per call)", **per_call.to_dict())]
    for label, fn in fns.items():
        t = try_time(fn, warmup=args.warmup, iters=args.iters, device=device, calls=calls, cuda_graph=True)
        entries.append(dict(what=label, **t.to_dict()) if not isinstance(t, str) else {"what": label, "error": t})
    base = next(e["median_ms"] for e in entries if e["what"] == "bf16" and "median_ms" in e)
    for e in entries:
        if "median_ms" in e:
            e["tflops"] = 2.0 * m * k * n / (e["median_ms"] * 1e-3) / 1e12
            e["vs_bf16"] = base / e["median_ms"]
    return {"shape": [m, k, n], "calls": calls, "entries": entries, "skipped": skipped}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base", help="loka.models ranker size whose GEMM shapes are timed")
    p.add_argument("--batch", type=int, default=8192, help="training batch size (M of the per-example sites)")
    p.add_argument("--max-shapes", type=int, default=8, help="time the site shapes with the most FLOPs first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15, help="timed samples per candidate")
    p.add_argument("--sample-ms", type=float, default=2.0, help="about how long one timed sample lasts")
    p.add_argument("--max-calls", type=int, default=50, help="most back-to-back calls per sample")
    p.add_argument("--kernels", default=None, help="comma-separated FP8 kernel names (default: every one)")
    p.add_argument("--json", required=True, help="where to write the table (rewritten after every GEMM)")
    args = p.parse_args(argv)
    if min(args.batch, args.max_shapes, args.iters, args.max_calls) < 1 or args.warmup < 0:
        p.error("--batch, --max-shapes, --iters and --max-calls must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check_kernels: no CUDA GPU here; use --device cpu to check the script", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    sites = ranker_gemm_sites(args.size, args.batch)
    doc = {"device": device_name(device), "representative": device.type == "cuda", "size": args.size,
           "batch": args.batch, "dtype": "bfloat16", "sites_total": len(sites),
           # the shapes with the most FLOPs, timed smallest first: the quick ones land before a time limit
           "sites": sorted(sites[:args.max_shapes], key=lambda site: site["flops"]),
           "rows": [], "done": False}
    path = Path(args.json)
    t0 = time.perf_counter()
    for site in doc["sites"]:
        for gemm in GEMMS:
            row = time_gemm(gemm_shape(gemm, site["m"], site["k"], site["n"]), dtype, device, args)
            doc["rows"].append(dict(site=[site["m"], site["k"], site["n"]], gemm=gemm, **row))
            doc["elapsed_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(doc, indent=1))  # a run stopped later keeps these rows
            print(f"gpu_check_kernels: {gemm} of {site['m']}x{site['k']}x{site['n']} done ({doc['elapsed_s']:.1f} s)",
                  flush=True)
    doc["done"] = True
    path.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
