"""``loka demo``: the whole workflow on the bundled ranker (``--mlp`` for the one-minute MLP table)."""

from __future__ import annotations

import argparse

from loka.app.demo import mlp as demo_mlp
from loka.app.demo.ranker import DemoConfig, run
from loka.cli_vocab import add_json, write_json
from loka.devices import target_names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on the bundled ranker")
    p.add_argument("--mlp", action="store_true", help="only the per-layer FP8 error table of a small MLP")
    p.add_argument("--size", default="auto", help="ranker size (default: small on CPU, base on CUDA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="torch device (default auto: cuda if available, else cpu)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="directory for reports, plan and checkpoints")
    p.add_argument("--warm-steps", type=int, default=None, help="bf16 steps before probing (CPU 150, CUDA 300)")
    p.add_argument("--probe-steps", type=int, default=None, help="training steps each probe watches (CPU 24, CUDA 40)")
    p.add_argument("--continue-steps", type=int, default=None,
                   help="steps of bf16 vs FP8 after conversion (CPU 100, CUDA 200)")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples for the gate (CPU 65536)")
    p.add_argument("--fp8", default="auto", choices=("auto", "plan", "safe-sites"),
                   help="FP8 model trained next to bf16: the plan; every accuracy-safe site; auto = the plan "
                        "unless it keeps everything in bf16")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and held-out examples where not given (CPU: warm 60, probe 12, continue 30, "
                        "eval 16384): a shorter run on a slow or busy machine; the gate may then be inconclusive")
    p.add_argument("--target", default=None, choices=target_names(),
                   help="a GPU to probe and plan for (every recipe it runs, FP8 and FP4 side by side; emulated "
                        "off that GPU); default: this device's recipes")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed (default 0)")
    add_json(p, "the summary (also in DIR/summary.json)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not args.mlp:
        return _run_ranker(args)

    print("FP8 error at each Linear's output, every Linear converted, vs the fp32 model")
    print("(errors accumulate: a layer's figure includes the error of the layers before it)\n")
    print(demo_mlp.run(seed=args.seed))
    return 0


def _run_ranker(args: argparse.Namespace) -> int:
    given = {"warm_steps": args.warm_steps, "probe_steps": args.probe_steps, "continue_steps": args.continue_steps,
             "eval_examples": args.eval_examples}
    try:
        cfg = DemoConfig(size=args.size, device=args.device, out_dir=args.out, seed=args.seed, fp8=args.fp8,
                         quick=args.quick, target=args.target, **given)
    except ValueError as exc:
        if getattr(args, "debug", False):
            raise  # --debug: the traceback
        print(f"loka demo: {exc}")
        return 2
    summary = run(cfg)
    if args.json:
        write_json(args.json, summary)
    return 0
