"""``loka convert``: the workflow's convert step on a ranker checkpoint, checked on one batch.

    loka convert --checkpoint run/checkpoint.pt --plan plan.json [--json convert.json]

Converts the checkpoint's model with the plan (or ``fp8``: every Linear tensorwise), prints
each site converted or kept in bf16 with the reason, and the relative change of every task's
logits on one synthetic batch against the unconverted model (FP8's error, as run here: the
plan's kernels where this machine has them). Conversion keeps ``nn.Linear``'s state_dict, so
the checkpoint itself is unchanged: ``train``, ``eval``, ``serve`` and ``gate`` take the same
``--plan`` to run it converted; the last line prints the gate command that checks its quality.
"""

from __future__ import annotations

import argparse
import copy

import torch

from loka.cli_vocab import add_device, add_json, resolve_device, write_json
from loka.models.checkpoint import load_model
from loka.models.precision import apply_precision
from loka.models.synthetic import SyntheticStream


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a ranker checkpoint with a plan and check it on one batch",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ranker checkpoint (.pt) written by `loka train`")
    p.add_argument("--plan", required=True, help="a plan JSON written by `loka plan`, or fp8 (every Linear tensorwise)")
    p.add_argument("--batch-size", type=int, default=256, help="examples in the check batch (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the check batch (default 0)")
    add_device(p, "device to run the check on")
    add_json(p)
    p.set_defaults(func=run)


def _rel_change(ref, new) -> float:
    den = float(torch.linalg.vector_norm(ref.double()))
    num = float(torch.linalg.vector_norm(new.double() - ref.double()))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint).to(device).eval()
    reference = copy.deepcopy(model)
    result = apply_precision(model, args.plan)
    if result is None:
        raise ValueError(f"--plan {args.plan!r} converts nothing; pass a plan JSON from `loka plan`, or fp8")
    batch = SyntheticStream(model.config, args.batch_size, seed=args.seed, device=device).batch(0)
    with torch.no_grad():
        ref, new = reference(batch), model(batch)
    change = {task: _rel_change(ref[task], new[task]) for task in ref}
    print(result.table())
    print(f"\n{len(result.converted)} sites converted, {len(result.skipped)} kept in bf16")
    print("relative change of the logits on one batch of " f"{args.batch_size} examples: "
          + ", ".join(f"{t} {v:.2e}" for t, v in change.items()))
    print(f"next: loka gate --baseline {args.checkpoint} --candidate {args.checkpoint} "
          f"--candidate-plan {args.plan}")
    if args.json:
        doc = {"checkpoint": str(args.checkpoint), "plan": str(args.plan), "converted": result.converted,
               "skipped": result.skipped, "logit_rel_change": change, "batch_size": args.batch_size}
        write_json(args.json, doc)
    return 0
