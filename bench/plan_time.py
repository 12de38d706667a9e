"""Does the plan's predicted speedup hold? probe -> plan -> measure, on the bundled ranker.

One command, on a GPU (H100-class; the issue's target is agreement within 15%):

    python bench/plan_time.py --ranker small --batch 8192 --out bench/results/plan_time_h100.md

CPU smoke run (tiny ranker, a few steps; NOT representative, checks the script only):

    python bench/plan_time.py --cpu-smoke

The CPU acceptance run of issue 5 (probe -> plan -> convert -> train on the ``small``
ranker, every decision explained in the printed plan table; timings not representative):

    python bench/plan_time.py --cpu --ranker small --batch 256 --steps 3

Steps: train the ranker for ``--steps`` steps under the probe (bf16 autocast on GPU),
measure site sensitivity, plan with on-device micro-benchmarks (``measure=True``,
cached; ``--refresh`` re-measures), then measure what the plan predicts:

- **predicted**: the plan's total GEMM time per step, bf16 vs planned (quantization
  included), and the ratio;
- **measured (sites)**: for every planned site, forward + backward of the site alone
  at its planned M, as ``nn.Linear`` (bf16) and as the planned ``Float8Linear``,
  summed over sites (CUDA events, median). This is what the prediction models, so
  the two should agree; the difference is reported as a percentage;
- **predicted (step)**: the measured bf16 step minus the GEMM time the plan saves
  (``loka.dispatch.predict.predicted_step``, Amdahl), beside
- **measured (step)**: a whole training step of the model, bf16 vs planned (it
  includes everything that is not a GEMM, which FP8 does not speed up). The issue's
  target is the two speed-ups within 15% of each other.

``--speed-model h100|h200`` plans from loka's GPU speed model (calibrated from
bench/results/gemm_calibration.json) instead of micro-benchmarks: what a plan made
away from the GPU would predict.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

from loka.dispatch import Budget, apply_plan, plan
from loka.dispatch.microbench import model_timings
from loka.dispatch.predict import predicted_step, prediction_error
from loka.kernels.costmodel import DEVICE_MODELS
from loka.nn import Float8Linear
from loka.probe.cli import train_with_probe
from loka.probe.config import ProbeConfig, SamplingSchedule
from loka.probe.probe import Probe
from loka.timer import device_name, time_fn
from loka.models.workload import ranker_workload


def _site_fwd_bwd(module: nn.Module, m: int, dtype, device):
    x = torch.randn(m, module.in_features, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, module.out_features, device=device, dtype=dtype)

    def step():
        y = module(x)
        y.backward(dy)
    return step


def measure_sites(p, dtype, device, iters: int, warmup: int) -> tuple[float, float]:
    """Summed fwd+bwd time of every planned site alone: (bf16 ms, planned ms)."""
    bf16_total = planned_total = 0.0
    for s in p.sites:
        lin = nn.Linear(s.in_features, s.out_features, device=device, dtype=dtype)
        t_hp = time_fn(_site_fwd_bwd(lin, max(s.m, 1), dtype, device), warmup=warmup, iters=iters, device=device)
        fast = Float8Linear.from_linear(lin, recipe=s.recipe(), kernels=s.kernels(), fallback="hp") if s.is_fp8 else lin
        t_fp8 = time_fn(_site_fwd_bwd(fast, max(s.m, 1), dtype, device), warmup=warmup, iters=iters, device=device)
        bf16_total += t_hp.median_ms
        planned_total += t_fp8.median_ms
    return bf16_total, planned_total


def measure_step(wl, device, autocast: bool, iters: int, warmup: int) -> float:
    opt = torch.optim.SGD(wl.model.parameters(), lr=1e-4)
    batch = wl.make_batch(10_000)

    def step():
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with amp:
            loss = wl.loss_fn(wl.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time_fn(step, warmup=warmup, iters=iters, device=device).median_ms


def _measure_and_report(p, wl, device, dtype, autocast: bool, iters: int, warmup: int, size: str, batch: int) -> list[str]:
    """Predicted (plan, Amdahl step) beside measured (sites, step) speed-ups, as Markdown lines."""
    pred = p.totals()
    site_bf16, site_fp8 = measure_sites(p, dtype, device, iters, warmup)
    step_bf16 = measure_step(wl, device, autocast, iters, warmup)
    apply_plan(wl.model, p, on_mismatch="bf16")
    step_fp8 = measure_step(wl, device, autocast, iters, warmup)
    meas = site_bf16 / site_fp8 if site_fp8 > 0 else float("nan")
    pred_speedup = pred["speedup"] or float("nan")
    step_pred = predicted_step(p, step_bf16)
    step_meas = step_bf16 / step_fp8
    lines = [f"# Plan prediction vs measurement: ranker {size}, batch {batch}", "",
             f"device: {device_name(device)} · torch {torch.__version__} · {iters} timed calls, median"]
    if device.type != "cuda":
        lines.append("**CPU run: NOT representative; for checking the script only.**")
    lines += ["", "| quantity | bf16 ms | planned ms | speedup |", "|---|---|---|---|",
              f"| predicted GEMM time (plan) | {pred['bf16_ms']:.4f} | {pred['planned_ms']:.4f} | {pred_speedup:.3f}x |",
              f"| measured sites fwd+bwd | {site_bf16:.4f} | {site_fp8:.4f} | {meas:.3f}x |",
              f"| predicted training step (measured bf16 step - plan's saving) | {step_pred['bf16_step_ms']:.4f} | "
              f"{step_pred['planned_step_ms']:.4f} | {step_pred['speedup']:.3f}x |",
              f"| measured training step | {step_bf16:.4f} | {step_fp8:.4f} | {step_meas:.3f}x |", "",
              f"Predicted vs measured site speedup: {100 * prediction_error(pred_speedup, meas):+.1f}% "
              f"({pred['fp8_gemms']} of {3 * len(p.sites)} GEMMs in FP8).",
              f"Predicted vs measured step speedup: {100 * prediction_error(step_pred['speedup'], step_meas):+.1f}% "
              "(target: within 15%).", "", p.summary()]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranker", default="small")
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=30, help="probe steps")
    ap.add_argument("--budget", default="", help="as `loka plan --budget`")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--refresh", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny ranker on CPU, a few steps (checks the script)")
    ap.add_argument("--cpu", action="store_true", help="--ranker/--batch on CPU (not representative)")
    ap.add_argument("--speed-model", choices=sorted(DEVICE_MODELS), default=None,
                    help="plan from loka's GPU speed model instead of micro-benchmarks")
    ap.add_argument("--cache-dir", default=None, help="micro-benchmark cache (default ~/.cache/loka/microbench)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, size, batch, steps, iters, warmup = torch.device("cpu"), "tiny", 64, 3, 3, 1
    elif args.cpu:
        device, size, batch, steps, iters, warmup = torch.device("cpu"), args.ranker, args.batch, args.steps, 3, 1
    else:
        if not torch.cuda.is_available():
            print("plan_time: no CUDA GPU here; use --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        device, size, batch, steps, iters, warmup = torch.device("cuda"), args.ranker, args.batch, args.steps, args.iters, 5
    autocast = device.type == "cuda"
    dtype = torch.bfloat16 if autocast else torch.float32
    wl = ranker_workload(size, batch_size=batch, device=str(device))
    probe = Probe(wl.model, ProbeConfig(schedule=SamplingSchedule(every=max(1, steps // 10)), candidates=("tensorwise", "rowwise")))
    train_with_probe(wl, probe, steps, lr=1e-3, device=str(device), autocast=autocast)
    held_out = [wl.make_batch(steps + i) for i in range(4)]
    probe.measure_sensitivity(lambda b: wl.loss_fn(wl.model, b), batches=held_out, progress=True)
    report = probe.report(model=f"ranker-{size}")
    if args.speed_model:
        kernels = ["scaled_mm"]
        p = plan(report, Budget.parse(args.budget), timings=model_timings(report, kernels, DEVICE_MODELS[args.speed_model]),
                 kernels=kernels, device=device, dtype=dtype, progress=False)
    else:
        p = plan(report, Budget.parse(args.budget), measure=True, device=device, dtype=dtype, refresh=args.refresh,
                 cache_dir=args.cache_dir, bench={"warmup": warmup, "iters": iters})
    lines = _measure_and_report(p, wl, device, dtype, autocast, iters, warmup, size, batch)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
