"""``loka probe``: train a model for N steps with the probe attached and write its report.

    loka probe --size small --steps 200 --every 10 --out runs/probe
    loka probe --model mypkg.models:make_workload --steps 100 --out runs/probe
    loka probe --size tiny --device b200 --out runs/probe-b200   (B200's recipes, emulated here)

Writes ``probe_report.json`` (the planner's input), ``probe_report.md`` and
``probe_report.html`` into ``--out`` and prints the summary table. On CPU the kernels
are not timed (a CPU timing decides nothing about a GPU plan; ``loka plan
--speed-model h100`` ranks them instead): ``--timing`` times them anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Mapping

import torch

from loka.cli_vocab import add_device, add_json, write_json
from loka.devices import Target, device_and_target, target_names
from loka.kernels.costmodel import DEVICE_MODELS
from loka.progress import progress_bar
from loka.probe.config import DEFAULT_CANDIDATES, DEFAULT_THRESHOLDS, ProbeConfig, SamplingSchedule
from loka.probe.headroom_section import with_headroom
from loka.probe.probe import Probe
from loka.probe.workload import NamedWorkload, load_workload


def register(subparsers, *, named_workloads: Mapping[str, NamedWorkload] | None = None, headroom=None) -> None:
    """Add ``loka probe``; ``named_workloads`` are the bare ``--model`` names offered (``loka.app.cli`` gives the ranker's).
    ``headroom(workload name, batch size, speed model) -> dict | None``: the FP8 headroom document the report
    shows as a section (``loka.app.cli`` gives the ranker's; the probe layer knows no speed-model pricing)."""
    p = subparsers.add_parser("probe", help="learn per-site FP8 error and statistics during training; write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="ranker size: tiny, small, base or large (default small)")
    p.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="your own model instead of the ranker: module:factory or file.py:factory (see loka.probe.workload)")
    p.add_argument("--steps", type=int, default=100, help="training steps to run (default 100)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the report files")
    p.add_argument("--every", type=int, default=10, help="sample every N steps (default 10)")
    p.add_argument("--warmup", type=int, default=0, help="steps to skip before sampling (default 0)")
    p.add_argument("--max-samples", type=int, default=20, help="at most this many sampled steps (default 20)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for the ranker (default 256)")
    p.add_argument("--recipes", default=None,
                   help="candidate recipes, comma-separated (default: every recipe the --device target runs, "
                        f"else {','.join(DEFAULT_CANDIDATES)})")
    p.add_argument("--predict", default="", help="recipes to predict from fitted distributions only")
    for g, t in DEFAULT_THRESHOLDS.items():
        p.add_argument(f"--threshold-{g}", type=float, default=t, help=f"relative-error threshold for {g} (default {t})")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--overhead-budget", type=float, default=None,
                   help="postpone samples while the probe would exceed this fraction of training time (e.g. 0.05)")
    p.add_argument("--include", action="append", default=[], help="fqn glob of sites to probe (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="fqn glob of sites to skip (repeatable)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    add_device(p, "a torch device, or a GPU to probe for (" + ", ".join(target_names()) + "): its recipes are "
               "measured, emulated on the CPU unless this machine is that GPU")
    p.add_argument("--autocast", action="store_true", help="train under bf16 autocast")
    p.add_argument("--kernels", default="", help="kernels to time, comma-separated (default: every available one)")
    p.add_argument("--timing", dest="timing", action="store_true", default=None,
                   help="time the kernels at each site's shape, on CPU too (default: on a GPU only)")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="skip kernel timing")
    p.add_argument("--sensitivity-batches", type=int, default=4, help="batches for the loss sensitivity (default 4)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the per-site loss sensitivity")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed (default 0)")
    add_json(p, "the report")
    if headroom is not None:
        p.add_argument("--headroom", default="h200", choices=(*sorted(DEVICE_MODELS), "none"),
                       help="add the FP8 headroom section for that GPU's speed model (default h200; none: leave it out)")
    p.set_defaults(func=run, named_workloads=dict(named_workloads or {}), headroom_of=headroom)


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def candidates_for(recipes: str | None, target: Target | None) -> tuple[str, ...]:
    """``--recipes`` as given (each must run on the target), else the target's recipes, else the defaults."""
    if recipes is None:
        return target.caps.recipes if target is not None else DEFAULT_CANDIDATES
    names = _split(recipes)
    foreign = [r for r in names if target is not None and not target.caps.runs(r)]
    if foreign:
        raise ValueError(f"--recipes {','.join(foreign)} do not run on {target.describe()}; it runs "
                         f"{','.join(target.caps.recipes)}")
    return names


def config_from_args(args, target: Target | None = None) -> ProbeConfig:
    return ProbeConfig(
        schedule=SamplingSchedule(warmup=args.warmup, every=args.every, max_samples=args.max_samples),
        include=tuple(args.include), exclude=tuple(args.exclude), candidates=candidates_for(args.recipes, target),
        predict=_split(args.predict), confidence=args.confidence, seed=args.seed,
        target=target.name if target is not None else None,
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
    device, target = device_and_target(args.device)
    named = getattr(args, "named_workloads", None) or {}
    if args.model in named:  # the old spelling of --size
        print(f"loka probe: --model {args.model} is deprecated; use --size {args.model}", file=sys.stderr)
    if args.model is None and args.size not in named:
        print(f"loka probe: --size {args.size!r} is not a ranker size; use one of {sorted(named)}, or --model "
              "MODULE:FACTORY for your own model", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args, target)
        workload = load_workload(args.model or args.size, named=named, batch_size=args.batch_size,
                                 seed=args.seed, device=str(device))
        probe = Probe(workload.model, cfg)
    except ValueError as exc:
        if getattr(args, "debug", False):
            raise  # --debug: the traceback
        print(f"loka probe: {exc}", file=sys.stderr)
        return 2
    train_with_probe(workload, probe, args.steps, lr=args.lr, device=str(device), autocast=args.autocast)
    if not probe.sampled_steps:
        print(f"loka probe: no step was sampled in {args.steps} steps (warmup={args.warmup}, every={args.every}); "
              "run more steps or sample more often", file=sys.stderr)
        return 2
    if not args.no_sensitivity:
        batches = [workload.make_batch(args.steps + i) for i in range(max(args.sensitivity_batches, 1))]
        probe.measure_sensitivity(lambda b: workload.loss_fn(workload.model, b), batches=batches, progress=True)
    away = target is not None and device.type == "cpu"  # the target's kernels do not run here
    timing = args.timing if args.timing is not None else device.type != "cpu"
    if away and timing:
        print(f"loka probe: not timing kernels: {target.describe()} is not this machine; `loka plan --device "
              f"{target.name}` prices its kernels with its speed model", file=sys.stderr)
    elif timing:
        probe.time_sites(device=str(device), progress=True, kernels=list(_split(args.kernels)) or None, warmup=2,
                         iters=5 if device.type == "cpu" else 20)
    report = probe.report(model=workload.name, steps=args.steps, device=str(device))
    headroom_of = getattr(args, "headroom_of", None)
    if headroom_of is not None and args.headroom != "none":
        doc = headroom_of(workload.name, args.batch_size, args.headroom)
        report = with_headroom(report, doc) if doc else report
    paths = report.save(Path(args.out))
    print(report.to_markdown(paths["json"]))
    if args.timing is None and not timing:
        print("kernel timing skipped on CPU: CPU timings decide nothing for a GPU plan (`loka plan --speed-model "
              "h100` ranks the kernels); --timing times them here anyway")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.json:
        write_json(args.json, report.to_json())
    return 0
