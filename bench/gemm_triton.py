"""Benchmark: Triton FP8 GEMM with fused activation quantization vs the alternatives.

One command (on an sm_89+ GPU, e.g. H100):

    python bench/gemm_triton.py --out bench/results/gemm_triton_h100.md

Dry run on CPU (Triton interpreter, tiny shapes; proves the script works, the
timings are NOT representative and are marked so):

    python bench/gemm_triton.py --dry-run --out /tmp/gemm_triton_dry.md

For each shape ``out[M,N] = x[M,K] · W[N,K]ᵀ`` (the fprop of a Linear, bf16 x,
W cached in FP8 rowwise as when serving) it times, per call:

- ``bf16``: ``x @ W.t()`` in bf16 (the baseline to beat);
- ``scaled_mm+quant``: ``loka.quantize`` of x (rowwise, eager PyTorch) then
  ``torch._scaled_mm`` (cuBLASLt);
- ``scaled_mm+quant(compiled)``: the same with the quantization under
  ``torch.compile`` (dynamo is reset per shape: see the timing pitfall in
  bench/results/h100_2026-11-22_gemm.md);
- ``scaled_mm ceiling``: ``torch._scaled_mm`` on an x quantized beforehand
  (what FP8 could give if quantization were free);
- ``triton fused`` / ``triton fused fast-acc``: ``fp8_mm_fused_quant``
  (autotuned during warm-up; the chosen tile BLOCK_MxBLOCK_NxBLOCK_KxN_TILES is reported).

and the Triton result's relative error against its PyTorch reference. The
issue's target: ``triton fused`` beats ``scaled_mm+quant`` at M=8192, K=N in 256..1024.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from triton_timing import cell, environment_lines, markdown_table, raise_recompile_limit, ratio, try_time

DEFAULT_SHAPES = [
    (8192, 256, 256), (8192, 512, 512), (8192, 1024, 1024), (8192, 2048, 2048),
    (8192, 256, 1024), (8192, 1024, 256), (8192, 64, 512), (8192, 512, 64),
    (2048, 512, 512), (2048, 1024, 1024),
    (32768, 256, 256), (32768, 512, 512), (32768, 1024, 1024),
]
DRY_SHAPES = [(64, 32, 32), (33, 64, 48)]
COLUMNS = ["bf16", "scaled_mm+quant", "scaled_mm+quant(compiled)", "scaled_mm ceiling",
           "triton fused", "triton fused fast-acc"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write the table to")
    p.add_argument("--shapes", type=str, default=None, help="comma-separated MxKxN, e.g. 8192x256x256,8192x512x512")
    p.add_argument("--granularity", choices=["rowwise", "tensorwise"], default="rowwise")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd quantization column")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (not representative)")
    return p.parse_args(argv)


def _shapes(args) -> list[tuple[int, int, int]]:
    if args.shapes:
        return [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    return DRY_SHAPES if args.dry_run else DEFAULT_SHAPES


def _candidates(x, w, gran, compile_quant):
    """name -> zero-argument callable returning out[M, N] (bf16)."""
    from loka.quantize import quantize

    from loka.kernels.triton_gemm import fp8_mm_fused_quant

    w_fp8, w_scale = quantize(w, "e4m3", gran)
    sb = w_scale.reshape(1, -1) if gran == "rowwise" else w_scale  # _scaled_mm wants (1, N)
    quant = lambda t: quantize(t, "e4m3", gran)  # noqa: E731
    quant_c = torch.compile(quant, dynamic=False) if compile_quant else None

    def scaled_mm(a_fp8, sa):
        return torch._scaled_mm(a_fp8, w_fp8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    x_fp8, sx = quant(x)
    cands = {
        "bf16": lambda: x @ w.t(),
        "scaled_mm+quant": lambda: scaled_mm(*quant(x)),
        "scaled_mm+quant(compiled)": (lambda: scaled_mm(*quant_c(x))) if quant_c else None,
        "scaled_mm ceiling": lambda: scaled_mm(x_fp8, sx),
        "triton fused": lambda: fp8_mm_fused_quant(x, w_fp8, w_scale, granularity=gran, out_dtype=torch.bfloat16),
        "triton fused fast-acc": lambda: fp8_mm_fused_quant(
            x, w_fp8, w_scale, granularity=gran, out_dtype=torch.bfloat16, fast_accum=True),
    }
    return cands, (w_fp8, w_scale)


def bench_shape(shape, args, device) -> list[str]:
    from loka.kernels.triton_gemm import fp8_mm_fused_quant_reference, kernels

    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(m * 31 + k * 7 + n)
    x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * k**-0.5
    if not args.no_compile:
        torch._dynamo.reset()
    cands, (w_fp8, w_scale) = _candidates(x, w, args.granularity, not args.no_compile)
    times = {name: (try_time(fn, device, args.warmup, args.iters) if fn else "skipped") for name, fn in cands.items()}
    tile = getattr(kernels().fp8_gemm_fused_quant_tuned, "best_config", None)
    try:
        out = cands["triton fused"]().float()
        ref = fp8_mm_fused_quant_reference(x, w_fp8, w_scale, granularity=args.granularity).float()
        err = f"{((out - ref).norm() / ref.norm()).item():.1e}"
    except Exception as exc:  # reported in the table
        err = f"n/a: {type(exc).__name__}"
    tile_str = "interpreter tile" if device.type == "cpu" else (
        "x".join(str(tile.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "N_TILES")) if tile else "?")
    return ([f"{m}x{k}x{n}"] + [cell(times[c]) for c in COLUMNS]
            + [ratio(times["bf16"], times["triton fused"]), ratio(times["scaled_mm+quant"], times["triton fused"]),
               ratio(times["bf16"], times["scaled_mm ceiling"]), tile_str, err])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Must precede the first import of the kernels (triton decides at definition time).
        os.environ["TRITON_INTERPRET"] = "1"
        args.no_compile, args.warmup, args.iters = True, 1, 3
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --dry-run on CPU", file=sys.stderr)
        return 2
    if not args.no_compile:
        raise_recompile_limit(64)  # one recompile per shape must not fall back to eager
    from loka.kernels.triton_gemm import triton_available

    ok, reason = triton_available(device)
    if not ok:
        print(f"the Triton kernel cannot run here: {reason}", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        tqdm = lambda it, **kw: it  # noqa: E731
    shapes = _shapes(args)
    rows = [bench_shape(s, args, device) for s in tqdm(shapes, desc="shapes")]
    header = (["MxKxN"] + COLUMNS + ["triton vs bf16", "triton vs scaled_mm+quant", "ceiling vs bf16",
                                      "triton tile", "triton rel. err"])
    text = "\n".join([
        f"# FP8 GEMM with fused activation quantization ({args.granularity}, e4m3, bf16 out)", "",
        *environment_lines(device, ["bench/gemm_triton.py", *(argv if argv is not None else sys.argv[1:])]), "",
        "Speedups are ratios of medians (> 1x: Triton or the ceiling is faster).", "",
        markdown_table(header, rows), "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
