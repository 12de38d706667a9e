"""``loka probe``: train a model for N steps with the probe attached and write its report.

    loka probe --size small --steps 200 --every 10 --out runs/probe
    loka probe --model mypkg.models:make_workload --steps 100 --out runs/probe

Writes ``probe_report.json`` (the planner's input), ``probe_report.md`` and
``probe_report.html`` into ``--out`` and prints the summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Mapping

import torch

from loka.progress import progress_bar
from loka.probe.config import DEFAULT_CANDIDATES, DEFAULT_THRESHOLDS, ProbeConfig, SamplingSchedule
from loka.probe.probe import Probe
from loka.probe.workload import NamedWorkload, load_workload


def register(subparsers, *, named_workloads: Mapping[str, NamedWorkload] | None = None) -> None:
    """Add ``loka probe``; ``named_workloads`` are the bare ``--model`` names offered (``loka.cli`` gives the ranker's)."""
    p = subparsers.add_parser("probe", help="learn per-site FP8 error and statistics during training; write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="ranker size (tiny/small/base/large) or module:factory (default small)")
    p.add_argument("--size", dest="model", help="ranker size: tiny, small, base or large (as --model SIZE)")
    p.add_argument("--steps", type=int, default=100, help="training steps to run (default 100)")
    p.add_argument("--out", required=True, help="directory for the report files")
    p.add_argument("--every", type=int, default=10, help="sample every N steps (default 10)")
    p.add_argument("--warmup", type=int, default=0, help="steps to skip before sampling (default 0)")
    p.add_argument("--max-samples", type=int, default=20, help="at most this many sampled steps (default 20)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for the ranker (default 256)")
    p.add_argument("--recipes", default=",".join(DEFAULT_CANDIDATES), help="candidate recipes, comma-separated")
    p.add_argument("--predict", default="", help="recipes to predict from fitted distributions only")
    for g, t in DEFAULT_THRESHOLDS.items():
        p.add_argument(f"--threshold-{g}", type=float, default=t, help=f"relative-error threshold for {g} (default {t})")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--overhead-budget", type=float, default=None,
                   help="postpone samples while the probe would exceed this fraction of training time (e.g. 0.05)")
    p.add_argument("--include", action="append", default=[], help="fqn glob of sites to probe (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="fqn glob of sites to skip (repeatable)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--autocast", action="store_true", help="train under bf16 autocast")
    p.add_argument("--kernels", default="", help="kernels to time, comma-separated (default: every available one)")
    p.add_argument("--no-timing", action="store_true", help="skip kernel timing")
    p.add_argument("--sensitivity-batches", type=int, default=4, help="batches for the loss sensitivity (default 4)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the per-site loss sensitivity")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run, named_workloads=dict(named_workloads or {}))


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def config_from_args(args) -> ProbeConfig:
    return ProbeConfig(
        schedule=SamplingSchedule(warmup=args.warmup, every=args.every, max_samples=args.max_samples),
        include=tuple(args.include), exclude=tuple(args.exclude), candidates=_split(args.recipes),
        predict=_split(args.predict), confidence=args.confidence, seed=args.seed,
        overhead_budget=args.overhead_budget,
        thresholds={g: getattr(args, f"threshold_{g}") for g in DEFAULT_THRESHOLDS},
    )


def train_with_probe(workload, probe, steps: int, *, lr: float, device: str, autocast: bool, progress: bool = True):
    """The plain training loop the CLI runs, with the probe's two lines in it; returns the losses."""


    model = workload.model
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    bar = progress_bar(range(steps), desc="probe", disable=not progress)
    for step in bar:
        batch = workload.make_batch(step)
        amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with probe.step(step), amp:
            loss = workload.loss_fn(probe.select(model), batch)
            loss.backward()
            for p in model.parameters():  # torch.optim.Adam takes dense gradients only
                if p.grad is not None and p.grad.is_sparse:  # (e.g. a fused embedding table's)
                    p.grad = p.grad.to_dense()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", sampled=len(probe.sampled_steps))
    return losses


def run(args) -> int:
    if args.steps < 1:
        print("loka probe: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
        workload = load_workload(args.model, named=getattr(args, "named_workloads", None), batch_size=args.batch_size,
                                 seed=args.seed, device=args.device)
        probe = Probe(workload.model, cfg)
    except ValueError as exc:
        if getattr(args, "debug", False):
            raise  # --debug: the traceback
        print(f"loka probe: {exc}", file=sys.stderr)
        return 2
    train_with_probe(workload, probe, args.steps, lr=args.lr, device=args.device, autocast=args.autocast)
    if not probe.sampled_steps:
        print(f"loka probe: no step was sampled in {args.steps} steps (warmup={args.warmup}, every={args.every}); "
              "run more steps or sample more often", file=sys.stderr)
        return 2
    if not args.no_sensitivity:
        batches = [workload.make_batch(args.steps + i) for i in range(max(args.sensitivity_batches, 1))]
        probe.measure_sensitivity(lambda b: workload.loss_fn(workload.model, b), batches=batches, progress=True)
    if not args.no_timing:
        probe.time_sites(device=args.device, progress=True, kernels=list(_split(args.kernels)) or None, warmup=2, iters=5 if args.device == "cpu" else 20)
    report = probe.report(model=workload.name, steps=args.steps, device=args.device)
    paths = report.save(Path(args.out))
    print(report.to_markdown(paths["json"]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
