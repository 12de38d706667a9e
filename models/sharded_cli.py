"""`loka train --nproc N --tables row-wise`: the sharded trainer's flags and its launcher.

``--out DIR`` writes a DCP checkpoint (``DIR/sharded_checkpoint``) at the end and ``--resume``
continues from one, on any number of processes. ``--nproc N`` starts N processes through torchrun (``torch.distributed.run``) running the same
command without ``--nproc``; ``--tables`` selects the TorchRec sharded path
(`loka.models.sharded_train`); without it the command trains as before (DDP under torchrun).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from .sharding import DENSE_PARALLEL, TABLE_COMMS, TABLE_SHARDINGS, ShardingConfig
from .guards import NonFiniteError
from .train import TrainConfig


def add_sharding_args(p) -> None:
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes started by torchrun on this machine (gloo on CPU, nccl on CUDA)")
    p.add_argument("--tables", default=None, choices=TABLE_SHARDINGS,
                   help="shard the embedding tables with TorchRec (fused row-wise Adagrad) and print the plan; "
                        "default: the pure-PyTorch fused table, replicated")
    p.add_argument("--dense-parallel", default="fsdp2", choices=DENSE_PARALLEL,
                   help="with --tables: FSDP2 (fully_shard per arch) or DDP for the dense arches (default fsdp2)")
    p.add_argument("--dense-optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="with --tables: AdamW (default) or SGD (exactness checks across world sizes)")
    p.add_argument("--fp8-all-gather", action="store_true",
                   help="with --tables, --plan fp8 and FSDP2: all-gather the FP8 sites' weights in FP8")
    p.add_argument("--table-comms", default="fp32", choices=TABLE_COMMS,
                   help="with --tables: precision of the pooled embeddings and their gradients between ranks")
    p.add_argument("--comm-bytes", action="store_true",
                   help="with --tables: count and print the bytes each rank sends per step per collective")


def launch(args) -> int | None:
    """Run this command on ``--nproc`` processes (returns torchrun's exit status); None when this
    process is to train itself (``--nproc 1``, or already a rank of a torchrun job)."""
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: give a number of processes >= 1.")
    if args.nproc == 1 or "RANK" in os.environ:
        return None
    argv = without_nproc(args._argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={port}", "-m", args._cli_module, *argv]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode


def without_nproc(argv: list[str]) -> list[str]:
    """The command line each rank runs: ``argv`` less ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def run_sharded(args, config: TrainConfig) -> int:
    """Train with sharded tables (``--tables``); rank 0 prints the plan, losses and speed."""
    from .sharded_train import train_sharded  # heavy: imports torchrec (~4 s), only when asked for

    for flag, given in (("--criteo", args.criteo), ("--compile", args.compile)):
        if given:
            raise ValueError(f"{flag} is not supported with --tables yet; drop it or train without --tables.")
    sharding = ShardingConfig(tables=args.tables, dense=args.dense_parallel, dense_optimizer=args.dense_optimizer,
                              fp8_all_gather=args.fp8_all_gather, table_comms=args.table_comms)
    save = os.path.join(args.out, "sharded_checkpoint") if args.out else None
    try:
        result = train_sharded(config, sharding, count_comms=args.comm_bytes, resume=args.resume, save=save)
    except NonFiniteError as exc:
        print(f"loka train: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps, {result.examples_per_s:,.0f} examples/s; global loss per step:")
        print(" ".join(f"{v:.6g}" for v in result.losses))
        for op, sent in result.comm_bytes.items():
            print(f"  {op:<32} {sent:>14,.0f} B sent per step (rank 0, counted at the process group)")
        if result.checkpoint:
            print(f"sharded checkpoint (DCP, loads on any number of ranks): {result.checkpoint}; "
                  f"continue with --resume {result.checkpoint}")
        print("not in sharded runs yet: periodic checkpoints, skipping NaN steps and the held-out evaluation")
        if result.stopped_by:
            print(f"stopped by {result.stopped_by} at step {result.step}", file=sys.stderr)
    return 128 + getattr(signal, result.stopped_by) if result.stopped_by else 0
