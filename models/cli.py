"""`loka train`, `loka eval`, `loka serve` and `loka info`: thin command-line layers over loka.models."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys

import torch

from loka.cli_vocab import DEVICE_HELP, add_alias, add_json, out_file, resolve_device, write_json

from .checkpoint import load_checkpoint, load_model
from .config import RankerConfig
from .criteo import CriteoStream
from .distributed import RankTimeoutError
from .engine import InferenceEngine
from .estimate import estimate_step
from .evaluate import compare, evaluate
from .guards import NonFiniteError
from .precision import apply_precision
from .ranker import Ranker
from .run_dir import ForcedStop
from .serve_extra import require_serve
from .sharded_cli import add_sharding_args, launch, run_sharded
from .synthetic import SyntheticStream
from .train import TrainConfig, train


def _clear_errors(command: str):
    """Bad input (ValueError: a bad flag value, an unsafe or foreign checkpoint, a malformed
    data line) ends as one line on stderr and exit status 2, not a traceback."""
    def wrap(run):
        @functools.wraps(run)
        def inner(args) -> int:
            try:
                return run(args)
            except ValueError as exc:
                if getattr(args, "debug", False):
                    raise
                print(f"loka {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
                return 2
        return inner
    return wrap


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the reference ranker (synthetic data or Criteo TSV)",
                       description="Train the reference ads ranker. Example: "
                                   "loka train --size small --steps 1000 --plan bf16 --out runs/small")
    p.add_argument("--size", default="small", help="tiny | small | base | large (default small)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=512, help="examples per step (default 512)")
    p.add_argument("--plan", dest="precision", default=None,
                   help="bf16 | fp32 | fp8 | path to a loka plan JSON (default: bf16; on --resume the "
                        "checkpoint's own precision)")
    add_alias(p, "--precision", "--plan")
    p.add_argument("--out", default=None, metavar="DIR", help="directory for metrics.jsonl, checkpoint.pt, eval results")
    p.add_argument("--lr-dense", type=float, default=None, help="AdamW lr (default: TrainConfig's)")
    p.add_argument("--lr-sparse", type=float, default=None, help="row-wise Adagrad lr (default: TrainConfig's)")
    p.add_argument("--schedule", default=None, choices=("constant", "cosine"),
                   help="learning-rate schedule over --steps (default: TrainConfig's)")
    p.add_argument("--task-weights", default=None, metavar="TASK=W,...",
                   help="loss weight per task, e.g. cvr=0.1 (default: TrainConfig's, CVR 0.1)")
    p.add_argument("--seed", type=int, default=0, help="model init seed")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--eval-examples", type=int, default=50_000, help="held-out examples at the end (0: none)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this long")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="write checkpoint_<step>.pt every STEPS steps (0: off; default: TrainConfig's, 1000)")
    p.add_argument("--checkpoint-minutes", type=float, default=None, metavar="MIN",
                   help="also every MIN minutes (0: off; default 10)")
    p.add_argument("--keep-checkpoints", type=int, default=None, metavar="K",
                   help="keep the newest K periodic checkpoints (default 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run already in --out (default: refuse)")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), default=None,
                   help="a NaN/Inf loss or gradient: stop with an error naming where (default), "
                        "or skip that step's update")
    p.add_argument("--on-nonfinite-dense", choices=("warn", "stop"), default=None,
                   help="NaN/Inf dense feature values: replace them and warn once with the count "
                        "(default), or stop with an error naming the step")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SEC",
                   help="data-parallel: fail after SEC seconds without an answer from a rank, naming it "
                        "within about 5 s more (default 300)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--criteo", nargs="+", default=None, metavar="TSV",
                   help="train on Criteo-format files instead of synthetic data")
    p.add_argument("--criteo-buckets", type=int, default=100_000)
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="malformed Criteo lines: fail, or skip and count them")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--no-progress", action="store_true")
    add_json(p, "the result (steps, speed, evaluation, checkpoint)")
    add_sharding_args(p)
    p.set_defaults(func=_run_train)


@_clear_errors("train")
def _run_train(args) -> int:
    launched = launch(args)
    if launched is not None:
        return launched
    if args.threads:
        torch.set_num_threads(args.threads)
    model = data = None
    eval_examples = args.eval_examples
    if args.criteo:
        data = CriteoStream(args.criteo, args.batch_size, args.criteo_buckets, on_error=args.on_error)
        model = Ranker(data.config(args.size))
        eval_examples = 0  # no held-out synthetic stream for real data; use `loka eval`
    recipe = {k: v for k, v in (("lr_dense", args.lr_dense), ("lr_sparse", args.lr_sparse),
                                ("lr_schedule", args.schedule),
                                ("task_weights", parse_task_weights(args.task_weights)),
                                ("checkpoint_every", args.checkpoint_every),
                                ("checkpoint_minutes", args.checkpoint_minutes),
                                ("keep_checkpoints", args.keep_checkpoints),
                                ("nonfinite", args.on_nonfinite),
                                ("nonfinite_dense", args.on_nonfinite_dense),
                                ("dist_timeout_s", args.dist_timeout)) if v is not None}
    config = TrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size,
                         precision=args.precision, out_dir=args.out, **recipe,
                         seed=args.seed, data_seed=args.data_seed,
                         device=args.device, compile=args.compile, eval_examples=eval_examples,
                         max_seconds=args.max_seconds, overwrite=args.overwrite,
                         log_every=args.log_every, progress=not args.no_progress)
    if args.tables:
        return run_sharded(args, config)
    try:
        result = train(config, model=model, data=data, resume=args.resume)
    except (NonFiniteError, RankTimeoutError) as exc:
        print(f"loka train: {exc}", file=sys.stderr)
        if isinstance(exc, RankTimeoutError):
            _exit_now(1)
        return 1
    except ForcedStop as exc:
        print(f"loka train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    print(f"trained {result.step} steps, {result.examples_per_s:,.0f} examples/s")
    if args.criteo:
        print(f"skipped malformed lines: {data.skipped}")
    if result.nonfinite_dense:
        print(f"NaN/Inf dense feature values replaced: {result.nonfinite_dense}", file=sys.stderr)
    if result.evaluation is not None:
        print(result.evaluation.table())
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.step}; continue with --resume "
              f"{result.checkpoint or '(no --out: nothing saved)'}", file=sys.stderr)
        return 128 + getattr(signal, result.stopped_by)  # the shell's convention for a signal
    if args.json:
        write_json(args.json, {"steps": result.step, "examples_per_s": result.examples_per_s,
                               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                               "evaluation": result.evaluation.to_dict() if result.evaluation is not None else None})
    return 0


def _exit_now(code: int) -> None:
    """End the process without interpreter teardown: a process group whose peer is frozen takes
    seconds to destroy in C++ (2-3 s measured on gloo), after the error is already said and
    every file is closed, so the survivor exits within --dist-timeout plus a few seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_task_weights(text: str | None) -> tuple[tuple[str, float], ...] | None:
    """``"cvr=0.1,ctr=1"`` -> (("cvr", 0.1), ("ctr", 1.0)); None stays None (the defaults)."""
    if text is None:
        return None
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, _, weight = (part.strip() for part in item.partition("="))
        try:
            pairs.append((task, float(weight)))
        except ValueError:
            task = ""
        if not task:
            raise SystemExit(f"loka train: --task-weights expects TASK=WEIGHT pairs like cvr=0.1, got {item!r}")
    return tuple(pairs)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a ranker checkpoint on held-out synthetic data",
                       description="NE / AUC / calibration per task beside the Bayes floor; with "
                                   "--compare, a paired bootstrap of the NE difference.")
    p.add_argument("--checkpoint", required=True, help="ranker checkpoint (.pt) written by `loka train`")
    p.add_argument("--plan", default=None, help="fp8 or a plan file to convert the model with")
    p.add_argument("--eval-examples", dest="examples", type=int, default=50_000,
                   help="held-out examples (default 50000)")
    add_alias(p, "--examples", "--eval-examples")
    p.add_argument("--eval-seed", type=int, default=1_000_003, help="held-out stream seed (default 1000003)")
    add_alias(p, "--seed", "--eval-seed")
    p.add_argument("--out", dest="outputs", default=None, metavar="DIR",
                   help="directory to write eval_outputs.npz (EvalOutputs) into, for `loka gate`")
    add_alias(p, "--outputs", "--out")
    p.add_argument("--compare", default=None, metavar="CHECKPOINT_B", help="paired NE comparison b - a")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (-: print the JSON instead of the table; "
                        "a bare --json, deprecated, does the same)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=_run_eval)


@_clear_errors("eval")
def _run_eval(args) -> int:
    device = resolve_device(args.device)
    model = load_model(args.checkpoint).to(device)
    if args.plan:
        apply_precision(model, args.plan)
    teacher = load_checkpoint(args.checkpoint)["train_config"].get("teacher_seed", 0)
    stream = SyntheticStream(model.config, min(4096, args.examples), seed=args.eval_seed, teacher_seed=teacher,
                             device=device)
    if args.compare:
        other = load_model(args.compare).to(device)
        results = compare(model, other, stream, n_examples=args.examples)
        out = {t: r.to_dict() for t, r in results.items()}
        print(json.dumps(out, indent=2))
        return 0
    report = evaluate(model, stream, n_examples=args.examples, progress=True)
    if args.outputs:
        report.outputs.save(out_file(args.outputs, "eval_outputs.npz"))
    if args.json and args.json != "-":
        write_json(args.json, report.to_dict())
    print(json.dumps(report.to_dict(), indent=2) if args.json == "-" else report.table())
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a ranker checkpoint over HTTP on loopback",
                       description="POST /score with one user and N candidates -> N scores per task; "
                                   "GET /health, GET /metrics. Limits: see models/README.md. SIGTERM "
                                   "or Ctrl-C stops gracefully and exits 128 + the signal (143, 130).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--plan", default=None, help="fp8 or a loka plan file (default: bf16)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--max-batch", type=int, default=1024, help="most examples per batched forward")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long to gather requests")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    p.add_argument("--max-inflight", type=int, default=4,
                   help="requests parsed and scored at once (bodies are read before, so a slow "
                        "client holds no slot); others wait")
    p.add_argument("--max-connections", type=int, default=1024, help="past this, requests get 503")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds for a request head, and for its body")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request may wait for a slot, and for its scores, before 503")
    add_json(p, "where it serves ({url, size, precision}) once listening")
    p.set_defaults(func=_run_serve)


@_clear_errors("serve")
def _run_serve(args) -> int:
    require_serve("loka serve")
    from .serve import ScoringServer, ServeConfig  # optional: the serve extra (uvicorn, h11, pydantic)

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_body_bytes=args.max_body_bytes, max_inflight=args.max_inflight,
                         max_connections=args.max_connections, read_timeout_s=args.read_timeout,
                         request_timeout_s=args.request_timeout)
    engine = InferenceEngine.from_checkpoint(args.checkpoint, plan=args.plan, compile=args.compile,
                                             device=args.device)
    engine.warmup()
    server = ScoringServer(engine, config)
    received: list[int] = []

    def record(signum, frame) -> None:
        received.append(signum)
        server.ask_stop()  # a signal before uvicorn installs its own handlers stops it as well

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handlers
    # it found: these record it, so both signals exit alike, 128 + signal (143, 130), as `train` does
    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"serving {engine.config.size} ranker ({engine.precision}) at {server.url}/score", flush=True)
    if args.json:
        write_json(args.json, {"url": server.url, "size": engine.config.size, "precision": str(engine.precision)})
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not received:
        return 0
    print(f"stopped by {signal.Signals(received[0]).name}", file=sys.stderr)
    return 128 + received[0]


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs per arch and peak memory of a training step",
                       description="Estimate one bf16 training step of a ranker size on fake CPU "
                                   "tensors (no GPU, no real allocation): parameters, GEMM FLOPs per "
                                   "example per arch (useful and executed) and peak GPU memory. "
                                   "Example: loka info --size large --batch-size 8192")
    p.add_argument("--size", default="small", help="tiny | small | base | large (default small)")
    p.add_argument("--batch-size", type=int, default=8192, help="examples per step (default 8192)")
    add_alias(p, "--batch", "--batch-size")
    p.add_argument("--checkpoint-blocks", choices=("on", "off"), default=None,
                   help="override the size's activation checkpointing")
    p.add_argument("--embedding-dtype", choices=("float32", "bfloat16"), default=None,
                   help="override the size's embedding table dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the history lengths")
    add_json(p, "the estimate")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    overrides = {}
    if args.checkpoint_blocks:
        overrides["checkpoint_blocks"] = args.checkpoint_blocks == "on"
    if args.embedding_dtype:
        overrides["embedding_dtype"] = args.embedding_dtype
    cfg = RankerConfig.from_size(args.size, **overrides)
    estimate = estimate_step(cfg, args.batch_size, seed=args.seed)
    print(estimate.table())
    if args.json:
        write_json(args.json, estimate.to_dict())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train`, `eval`, `serve` and `info` to the `loka` command."""
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_serve(subparsers)
    _add_info(subparsers)
