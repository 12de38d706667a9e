"""GEMM table: bf16 vs every FP8 kernel (quantization included) vs the pre-quantized FP8 ceiling.

One command, on a GPU (H100-class; figures go to bench/results/):

    python bench/gemm_table.py --ranker small --m 2048,8192,32768 --out bench/results/gemm_table_h100.md

CPU smoke run (tiny shapes; proves the script works; the numbers are NOT
representative of anything and the output says so):

    python bench/gemm_table.py --cpu-smoke

Shapes: every distinct (K, N) of the ranker's Linear sites (``--ranker``: a
loka.models size, built on the meta device, nothing allocated) or ``--kn``,
crossed with the batch sizes ``--m``; per site shape the three GEMMs (fprop,
dgrad, wgrad) are timed in their own shapes. Per GEMM it times, with
loka.timer.time_fn (CUDA events, warm-up, median and p10/p90 of
``--iters`` calls):

- ``bf16``: the hp GEMM (the baseline);
- every registered FP8 kernel available here, for each recipe it takes at that
  shape, *including* the per-call dynamic quantization of both operands;
- ``ceiling``: ``torch._scaled_mm`` on operands quantized beforehand
  (tensorwise e4m3): what FP8 gives if quantization were free.

Ratios are bf16 time / time (above 1: faster than bf16). Eager mode, no
torch.compile (so no dynamo recompile-limit pitfall). Kernels that are not
available are listed with the reason.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from loka.kernels import KERNELS
from loka.recipe import gemm_shape
from loka.timer import device_name, time_fn
from loka.quantize import quantize
from loka.recipe import GEMMS, HP_GEMM, as_recipe

RECIPES = ("tensorwise", "rowwise", "blockwise", "mx")
SMOKE = dict(m=[32], kn=[(64, 32), (40, 24)], iters=3, warmup=1)


def ranker_kn(size: str) -> list[tuple[int, int]]:
    """Distinct (in, out) features of the Linears of the ranker ``size`` (built on the meta device)."""
    from loka.models import Ranker, RankerConfig

    with torch.device("meta"):
        model = Ranker(RankerConfig.from_size(size))
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})


def _ceiling_fn(a, b, dtype):
    a8, sa = quantize(a, "e4m3")
    b8, sb = quantize(b, "e4m3")
    a8, b8t = a8.contiguous(), b8.contiguous().t()
    return lambda: torch._scaled_mm(a8, b8t, scale_a=sa, scale_b=sb, out_dtype=dtype)


def time_gemm(shape, dtype, device, iters: int, warmup: int) -> list[dict]:
    """Rows for one GEMM shape ``(M, K, N)``: bf16, each kernel/recipe, ceiling."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype) * 0.05
    bf16 = time_fn(lambda: KERNELS.get("bf16").mm(a, b, HP_GEMM, out_dtype=dtype), warmup=warmup, iters=iters,
                   device=device)
    rows = [{"what": "bf16", "t": bf16}]
    for kernel in KERNELS:
        if kernel.hp or kernel.reference or not kernel.available(device):
            continue
        for rname in RECIPES:
            g = as_recipe(rname).fprop  # fprop's e4m3 x e4m3: the same cast cost for every GEMM's shape
            if not kernel.supports(g, shape, dtype, device):
                continue
            t = time_fn(lambda: kernel.mm(a, b, g, out_dtype=dtype), warmup=warmup, iters=iters, device=device)
            rows.append({"what": f"{kernel.name}/{rname}", "t": t})
    if k % 16 == 0 and n % 16 == 0 and KERNELS.get("scaled_mm").available(device):
        rows.append({"what": "ceiling (pre-quantized scaled_mm)",
                     "t": time_fn(_ceiling_fn(a, b, dtype), warmup=warmup, iters=iters, device=device)})
    for r in rows:
        r["ratio"] = bf16.median_ms / r["t"].median_ms
    return rows


def render(results: list[tuple[str, tuple, list[dict]]], header: list[str]) -> str:
    lines = header + ["", "| gemm | M×K×N | kernel/recipe | median ms | p10–p90 ms | vs bf16 |",
                      "|---|---|---|---|---|---|"]
    for gemm, (m, k, n), rows in results:
        for r in rows:
            t = r["t"]
            lines.append(f"| {gemm} | {m}×{k}×{n} | {r['what']} | {t.median_ms:.4f} | {t.p10_ms:.4f}–{t.p90_ms:.4f} | "
                         f"{r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranker", default="small", help="loka.models size whose Linear shapes are timed")
    p.add_argument("--kn", default=None, help="explicit K:N pairs instead, e.g. 256:256,512:1024")
    p.add_argument("--m", default="8192", help="comma-separated batch sizes M")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="Markdown file to write (printed either way)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU; NOT representative")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, ms, kn, iters, warmup = torch.device("cpu"), SMOKE["m"], SMOKE["kn"], SMOKE["iters"], SMOKE["warmup"]
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("gemm_table: no CUDA GPU here; use --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        ms = [int(v) for v in args.m.split(",")]
        kn = ([tuple(int(x) for x in pair.split(":")) for pair in args.kn.split(",")] if args.kn
              else ranker_kn(args.ranker))
        iters, warmup = args.iters, args.warmup
    dtype = torch.bfloat16
    header = [f"# GEMM table: bf16 vs FP8 kernels (quantization included) vs pre-quantized ceiling",
              "", f"device: {device_name(device)} · torch {torch.__version__} · python {platform.python_version()} · "
              f"dtype bf16 · {iters} timed calls after {warmup} warm-up, median"]
    if device.type != "cuda":
        header.append("**CPU run: NOT representative of GPU speed; for checking the script only.**")
    unavailable = [f"{k.name} ({k.available(device).reason})" for k in KERNELS if not k.hp and not k.available(device)]
    if unavailable:
        header.append("Unavailable here: " + "; ".join(unavailable))
    results = []
    for m in ms:
        for k, n in kn:
            for gemm in GEMMS:
                shape = gemm_shape(gemm, m, k, n)
                results.append((gemm, shape, time_gemm(shape, dtype, device, iters, warmup)))
    text = render(results, header)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
