"""GPU timings of the mods that are about speed: fused norm+quantize and horizontal/grouped GEMMs.

On an H100-class GPU (the documented command; figures go to bench/results/):

    .venv/bin/python bench/mods_gpu.py --out bench/results/mods_gpu_h100.json

On a machine without CUDA it runs a smoke mode (tiny shapes, wall-clock timer,
PyTorch reference kernels) that only checks the script works: its numbers are
NOT representative and are not written unless ``--out`` is given.

Timed with CUDA events (median of ``--iters`` after ``--warmup``):

1. norm + quantize: ``F.layer_norm`` then ``loka.quantize(y, "e4m3", "rowwise")``
   (separate) vs ``fused_norm_quant`` (one Triton pass), at ranker shapes; with
   the bytes each moves (9 vs 3 per element, bf16 in).
2. horizontal fusion: k Linears sharing an input, k GEMMs vs one GEMM of width
   ΣN, in bf16 and in FP8 (``torch._scaled_mm`` rowwise, weights pre-quantized,
   activation quantized once per call in both cases).
3. grouped GEMM: G same-shape Linears on different inputs, G GEMMs vs one
   ``torch._grouped_mm`` (or ``torch.bmm`` where grouped_mm does not run), and in
   FP8 G ``_scaled_mm`` vs one ``torch._scaled_grouped_mm`` where it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loka.quantize import quantize  # noqa: E402
from loka.mods.grouped import grouped_linear, grouped_mm_works, scaled_grouped_linear, scaled_grouped_mm_works  # noqa: E402

GPU_NORM_SHAPES = [(4096, 256), (16384, 512), (16384, 1024), (32768, 2048)]
GPU_FUSION = [(8192, 512, (128, 128, 256)), (16384, 1024, (256, 256, 512)), (32768, 1024, (512, 512, 1024))]
GPU_GROUPED = [(8, 4096, 256, 256), (8, 8192, 512, 512), (16, 4096, 1024, 1024)]
SMOKE_NORM_SHAPES = [(64, 32)]
SMOKE_FUSION = [(64, 32, (16, 16, 32))]
SMOKE_GROUPED = [(3, 32, 32, 16)]


def timer(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter in smoke mode."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_norm_quant(shapes, device, dtype, warmup, iters) -> list[dict]:
    from loka.mods.fused_norm_quant import norm_quant

    cuda = device.type == "cuda"
    rows = []
    for m, n in shapes:
        x = torch.randn(m, n, device=device, dtype=dtype)
        w, b = torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)

        def separate():
            y = F.layer_norm(x, (n,), w, b, 1e-5)
            return quantize(y, "e4m3", "rowwise")

        def fused():
            return norm_quant(x, w, b, kind="layernorm", eps=1e-5, fmt="e4m3", backend="auto")

        with torch.no_grad():
            t_sep, t_fused = timer(separate, warmup, iters, cuda), timer(fused, warmup, iters, cuda)
        e = x.element_size()
        rows.append({"M": m, "N": n, "separate_ms": t_sep, "fused_ms": t_fused, "speedup": t_sep / t_fused,
                     "bytes_separate": m * n * (e + e + 2 * e + 1), "bytes_fused": m * n * (e + 1)})
    return rows


def _fp8_rowwise(x):
    x_fp8, s = quantize(x, "e4m3", "rowwise")
    return x_fp8, s.float()


def bench_fusion(configs, device, dtype, warmup, iters) -> list[dict]:
    cuda = device.type == "cuda"
    fp8 = cuda and torch.cuda.get_device_capability(device) >= (8, 9)
    rows = []
    for m, k, ns in configs:
        x = torch.randn(m, k, device=device, dtype=dtype)
        ws = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for n in ns]
        w_cat = torch.cat(ws)  # [ΣN, K]
        row = {"M": m, "K": k, "N": list(ns)}
        with torch.no_grad():
            row["bf16_separate_ms"] = timer(lambda: [x @ w.t() for w in ws], warmup, iters, cuda)
            row["bf16_fused_ms"] = timer(lambda: (x @ w_cat.t()).split(list(ns), -1), warmup, iters, cuda)
            if fp8:
                wq = [_fp8_rowwise(w) for w in ws]
                wq_cat = _fp8_rowwise(w_cat)

                def mm(xq, sx, wf, sw):
                    return torch._scaled_mm(xq, wf.t(), scale_a=sx, scale_b=sw.reshape(1, -1), out_dtype=torch.bfloat16)

                def sep():
                    xq, sx = _fp8_rowwise(x)
                    return [mm(xq, sx, wf, sw) for wf, sw in wq]

                def fus():
                    xq, sx = _fp8_rowwise(x)
                    return mm(xq, sx, *wq_cat).split(list(ns), -1)

                row["fp8_separate_ms"], row["fp8_fused_ms"] = timer(sep, warmup, iters, cuda), timer(fus, warmup, iters, cuda)
        rows.append(row)
    return rows


def bench_grouped(configs, device, dtype, warmup, iters) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for g, m, k, n in configs:
        xs = torch.randn(g, m, k, device=device, dtype=dtype)
        ws = torch.randn(g, n, k, device=device, dtype=dtype) / k**0.5
        ok, why = grouped_mm_works(device.type, dtype)
        with torch.no_grad():
            row = {"G": g, "M": m, "K": k, "N": n, "grouped_backend": "grouped_mm" if ok else f"bmm ({why})",
                   "separate_ms": timer(lambda: [xs[i] @ ws[i].t() for i in range(g)], warmup, iters, cuda),
                   "grouped_ms": timer(lambda: grouped_linear(xs, ws), warmup, iters, cuda)}
            if cuda and scaled_grouped_mm_works("cuda")[0]:
                def sep_fp8():  # quantize both operands per call, like scaled_grouped_linear does
                    outs = []
                    for i in range(g):
                        (xq, sx), (wq, sw) = _fp8_rowwise(xs[i]), _fp8_rowwise(ws[i])
                        outs.append(torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.reshape(1, -1), out_dtype=torch.bfloat16))
                    return outs

                row["fp8_separate_ms"] = timer(sep_fp8, warmup, iters, cuda)
                row["fp8_grouped_ms"] = timer(lambda: scaled_grouped_linear(xs, ws), warmup, iters, cuda)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the figures (GPU runs)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    if not cuda:
        print("no CUDA: smoke mode (tiny shapes, wall clock, reference kernels); numbers are NOT representative")
        args.warmup, args.iters = 1, 3
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke, not representative)",
        "torch": torch.__version__,
        "norm_quant": bench_norm_quant(GPU_NORM_SHAPES if cuda else SMOKE_NORM_SHAPES, device, dtype, args.warmup, args.iters),
        "horizontal": bench_fusion(GPU_FUSION if cuda else SMOKE_FUSION, device, dtype, args.warmup, args.iters),
        "grouped": bench_grouped(GPU_GROUPED if cuda else SMOKE_GROUPED, device, dtype, args.warmup, args.iters),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
