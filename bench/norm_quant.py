"""Benchmark: fused LayerNorm/RMSNorm + FP8 quantize vs norm followed by a separate quantize.

One command (on an sm_89+ GPU, e.g. H100):

    python bench/norm_quant.py --out bench/results/norm_quant_h100.md

Dry run on CPU (Triton interpreter, tiny shapes; timings NOT representative):

    python bench/norm_quant.py --dry-run --out /tmp/norm_quant_dry.md

Per shape ``x[M, N]`` (bf16) it times:

- ``norm``: ``F.layer_norm`` / RMSNorm alone, bf16 out (what the model does without FP8);
- ``norm+quant``: the norm (bf16 out) then ``loka.quantize`` rowwise e4m3 (eager);
- ``norm+quant(compiled)``: the same two steps under ``torch.compile``;
- ``fused``: ``fused_norm_quant`` (one Triton pass).

Bytes moved are *computed*, not measured: the minimum each pipeline must move
(x read in bf16, y written/read in bf16, y_fp8 written, one float32 scale per
row, weight and bias read once). The unfused minimum assumes the quantize step
is ideal (one amax read of y and one cast read of y); eager PyTorch moves more.
``GB/s`` is the computed bytes over the measured median time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from triton_timing import (
    Timing,
    cell,
    environment_lines,
    markdown_table,
    median_or_none,
    raise_recompile_limit,
    ratio,
    try_time,
)

DEFAULT_SHAPES = [(m, n) for m in (8192, 32768) for n in (256, 512, 1024, 2048, 4096)]
DRY_SHAPES = [(64, 48), (33, 256)]
COLUMNS = ["norm", "norm+quant", "norm+quant(compiled)", "fused"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write the table to")
    p.add_argument("--shapes", type=str, default=None, help="comma-separated MxN, e.g. 8192x512,8192x1024")
    p.add_argument("--kind", choices=["layernorm", "rmsnorm"], default="layernorm")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd column")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (not representative)")
    return p.parse_args(argv)


def bytes_moved(m: int, n: int, kind: str) -> dict[str, int]:
    """Minimum HBM bytes per pipeline for bf16 x[M, N] (see module doc)."""
    params = n * 2 * (2 if kind == "layernorm" else 1)  # bf16 weight (+ bias)
    x_read, y_bf16, y_fp8, scales = m * n * 2, m * n * 2, m * n, m * 4
    norm = x_read + y_bf16 + params
    return {
        "norm": norm,
        "norm+quant": norm + 2 * y_bf16 + y_fp8 + scales,  # amax read of y, cast read of y, write y_fp8
        "fused": x_read + y_fp8 + scales + params,
    }


def _norm_fn(kind: str):
    def norm(x, w, b):
        if kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).to(x.dtype)

    return norm


def _candidates(x, w, b, kind, compile_):
    from loka.quantize import quantize

    from loka.kernels.triton_norm_quant import fused_norm_quant

    norm = _norm_fn(kind)
    norm_quant = lambda: quantize(norm(x, w, b), "e4m3", "rowwise")  # noqa: E731
    compiled = torch.compile(lambda x_: quantize(norm(x_, w, b), "e4m3", "rowwise"), dynamic=False) if compile_ else None
    return {
        "norm": lambda: norm(x, w, b),
        "norm+quant": norm_quant,
        "norm+quant(compiled)": (lambda: compiled(x)) if compiled else None,
        "fused": lambda: fused_norm_quant(x, w, b, kind=kind),
    }


def _gbps(nbytes: int, t: Timing | str) -> str:
    ms = median_or_none(t)
    return f"{nbytes / (ms * 1e-3) / 1e9:.0f}" if ms else "n/a"


def bench_shape(shape, args, device) -> list[str]:
    m, n = shape
    gen = torch.Generator(device=device).manual_seed(m * 13 + n)
    x = torch.randn(m, n, device=device, generator=gen).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(n, device=device, generator=gen)).to(torch.bfloat16)
    b = (0.1 * torch.randn(n, device=device, generator=gen)).to(torch.bfloat16) if args.kind == "layernorm" else None
    if not args.no_compile:
        torch._dynamo.reset()
    with torch.inference_mode():
        cands = _candidates(x, w, b, args.kind, not args.no_compile)
        times = {k: (try_time(f, device, args.warmup, args.iters) if f else "skipped") for k, f in cands.items()}
    nb = bytes_moved(m, n, args.kind)
    return ([f"{m}x{n}"] + [cell(times[c]) for c in COLUMNS]
            + [ratio(times["norm+quant"], times["fused"]), ratio(times["norm+quant(compiled)"], times["fused"]),
               f"{nb['norm+quant'] / 1e6:.2f}", f"{nb['fused'] / 1e6:.2f}", f"{nb['norm+quant'] / nb['fused']:.2f}x",
               _gbps(nb["fused"], times["fused"])])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        args.no_compile, args.warmup, args.iters = True, 1, 3
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --dry-run on CPU", file=sys.stderr)
        return 2
    if not args.no_compile:
        raise_recompile_limit(64)  # per-shape recompiles must not fall back to eager
    from loka.kernels.triton_gemm import triton_available

    ok, reason = triton_available(device)
    if not ok:
        print(f"the Triton kernel cannot run here: {reason}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else DRY_SHAPES if args.dry_run else DEFAULT_SHAPES)
    rows = [bench_shape(s, args, device) for s in tqdm(shapes, desc="shapes")]
    header = ["MxN"] + COLUMNS + ["fused vs norm+quant", "fused vs compiled", "MB unfused (min)", "MB fused",
                                  "bytes ratio", "fused GB/s"]
    text = "\n".join([
        f"# Fused {args.kind} + FP8 rowwise quantize (e4m3, bf16 in)", "",
        *environment_lines(device, ["bench/norm_quant.py", *(argv if argv is not None else sys.argv[1:])]), "",
        "Speedups are ratios of medians (> 1x: fused is faster). Bytes are computed minima (module doc).", "",
        markdown_table(header, rows), "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
