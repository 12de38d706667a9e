"""``loka demo``: the whole workflow on the bundled ranker (``--mlp`` for the one-minute MLP table)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on the bundled ranker")
    p.add_argument("--mlp", action="store_true", help="only the per-layer FP8 error table of a small MLP")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from loka import demo_mlp

    print("FP8 error at each Linear's output, every Linear converted, vs the fp32 model")
    print("(errors accumulate: a layer's figure includes the error of the layers before it)\n")
    print(demo_mlp.run(seed=args.seed))
    return 0
