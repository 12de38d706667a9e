"""Train the ranker: `loka.models.train(TrainConfig(...))`, or `loka train` on the command line.

AdamW for the dense parameters and row-wise Adagrad for the embedding tables; bf16 autocast
where the device supports it; precision bf16 / fp8 / a loka plan (see `precision.py`);
a tqdm bar with loss and examples/s; a JSONL metrics log; checkpoints that resume exactly
from any step (model, optimizers, schedule, RNG, stream position, precision; `resume.py`),
written periodically, on SIGTERM/SIGINT and never over another run (`run_dir.py`), and
never with NaN/Inf in them (`guards.py`). Under ``torchrun --nproc_per_node=N`` the same
function runs data-parallel (DDP; gloo on CPU, nccl on CUDA), each rank reading its own
slice of the stream, with collectives bounded by ``dist_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from loka.progress import progress_bar

from .batch import Batch, example_batch
from .checkpoint import load_checkpoint, load_model_state
from .config import SIZES, RankerConfig
from .distributed import DistContext, init_distributed, wrap_ddp
from .guards import (MAX_CONSECUTIVE_SKIPS, NONFINITE_DENSE_POLICIES, NONFINITE_POLICIES, NonFiniteError,
                     check_batch, diagnose, grads_finite, last_good, report_nonfinite_dense)
from .evaluate import evaluate
from .optim import build_optimizers
from .precision import Precision, apply_plan_producers, apply_precision, check_precision
from .resume import load_optimizers, restore_rng, resume_precision
from .run_dir import RunSaver, StopSignals, claim_out_dir, new_run_id
from .ranker import Ranker
from .synthetic import SyntheticStream


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``steps`` counts optimizer steps; each rank sees ``batch_size`` examples a step.

    The default recipe (AdamW 3e-3, row-wise Adagrad 0.1, 20 warm-up steps, cosine decay to 0.1x
    at ``steps``, CVR loss weighted 0.1) is the one `small` was measured with (see
    models/README.md, acceptance). The cosine spans ``steps``: resume with the same ``steps`` to
    continue the same schedule.
    task_weights: (task, weight) pairs multiplying each task's loss in the total (tasks not
    named weigh 1); None (the default) is ``DEFAULT_TASK_WEIGHTS`` for the tasks the model has,
    while weights given explicitly must name tasks of the model. Each task's loss is a mean over the examples it applies to, so CVR's mean
    over the ~15 clicks of a 512 batch would otherwise weigh each click about 34x an
    impression in CTR's; at weight 0.1 its noisy gradient no longer drowns the CTR signal in
    the shared trunk and tables (models/README.md, acceptance).
    decay_sparse: apply the schedule to the embeddings' Adagrad too (False: warm-up only).
    precision: "bf16" | "fp32" | "fp8" | path to a loka plan JSON; None (the default) is bf16 for
    a new run and the checkpoint's own precision (and plan) on resume, so an FP8 run resumes
    in FP8. autocast: "auto" (bf16 on devices that support it fast, i.e. CUDA with bf16; off
    on CPU), "on" or "off".
    out_dir: where metrics.jsonl, checkpoints and eval results go (None: nothing written).
    A directory holding another run is refused unless ``overwrite``.
    checkpoint_every / checkpoint_minutes: write ``checkpoint_<step>.pt`` every N steps and
    every M minutes (0 turns either off), keeping the newest ``keep_checkpoints``; SIGTERM
    or SIGINT ends the run after the current step with ``checkpoint.pt`` written.
    nonfinite: what a NaN/Inf loss or gradient does: "stop" (raise `NonFiniteError` naming
    where it appeared; no checkpoint is written) or "skip" (drop that step's update and go
    on; a parameter already NaN/Inf still stops). See `guards.py`.
    nonfinite_dense: NaN/Inf dense feature values: "warn" (the dense arch replaces them, NaN -> 0,
    +-Inf -> +-1e30; the first batch with any is warned about once, the run's count is
    ``TrainResult.nonfinite_dense`` and in metrics.jsonl) or "stop" (ValueError naming the step).
    max_seconds: stop early once training has run this long (the step reached is reported).
    dist_timeout_s: how long a collective may wait for another rank before the run fails
    naming the rank that stopped answering (data-parallel runs only); the check that names it
    adds at most 5 s (`distributed.MONITOR_TIMEOUT_S`).
    """

    size: str = "small"
    steps: int = 200
    batch_size: int = 512
    lr_dense: float = 3e-3
    lr_sparse: float = 0.1
    weight_decay: float = 1e-5
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_sparse: bool = True
    task_weights: tuple[tuple[str, float], ...] | None = None
    precision: str | None = None
    autocast: str = "auto"
    seed: int = 0
    data_seed: int = 0
    teacher_seed: int = 0
    device: str = "auto"
    compile: bool = False
    out_dir: str | None = None
    log_every: int = 10
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 3
    overwrite: bool = False
    nonfinite: str = "stop"
    nonfinite_dense: str = "warn"
    eval_examples: int = 0
    eval_seed: int = 1_000_003
    max_seconds: float | None = None
    dist_timeout_s: float = 300.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.size not in SIZES and self.size != "custom":
            raise ValueError(f"size={self.size!r} is unknown; choose one of {sorted(SIZES)}.")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 1.")
        if not (0 < self.lr_dense < math.inf and 0 < self.lr_sparse < math.inf):
            raise ValueError(f"Learning rates must be finite and > 0, got lr_dense={self.lr_dense}, "
                             f"lr_sparse={self.lr_sparse}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError("lr_schedule must be 'constant' or 'cosine' (decays to min_lr_ratio at `steps`).")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1].")
        if self.autocast not in ("auto", "on", "off"):
            raise ValueError("autocast must be 'auto', 'on' or 'off'.")
        if self.checkpoint_every < 0 or self.eval_examples < 0 or self.warmup_steps < 0:
            raise ValueError("checkpoint_every, eval_examples and warmup_steps must be >= 0.")
        self._check_run_limits()
        if self.task_weights is not None:
            pairs = [tuple(p) for p in self.task_weights]
            if any(len(p) != 2 or not isinstance(p[0], str) or not float(p[1]) >= 0 for p in pairs):
                raise ValueError(f"task_weights={self.task_weights!r} must be (task, weight) pairs with "
                                 "weight >= 0, e.g. (('cvr', 0.1),).")
            object.__setattr__(self, "task_weights", tuple((t, float(w)) for t, w in pairs))
        if self.precision is not None:
            check_precision(self.precision)

    def _check_run_limits(self) -> None:
        if not 0 <= self.checkpoint_minutes < math.inf or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_minutes must be >= 0 (0: off) and keep_checkpoints >= 1.")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={self.nonfinite!r}: choose one of {NONFINITE_POLICIES}.")
        if self.nonfinite_dense not in NONFINITE_DENSE_POLICIES:
            raise ValueError(f"nonfinite_dense={self.nonfinite_dense!r}: choose one of {NONFINITE_DENSE_POLICIES}.")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds={self.max_seconds} must be > 0 (None: no time limit).")
        if not 0 < self.dist_timeout_s < math.inf:
            raise ValueError(f"dist_timeout_s={self.dist_timeout_s} must be a finite number of seconds > 0.")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    """What a run produced. ``losses[i]`` is the total loss of step ``first_step + i`` on this rank."""

    model: Ranker
    step: int
    first_step: int
    losses: list[float] = field(default_factory=list)
    examples_per_s: float = 0.0
    out_dir: Path | None = None
    checkpoint: Path | None = None
    evaluation: object | None = None
    convert_result: object | None = None
    producers: object | None = None  # loka ModResult of the plan's norm_quant sites, None without
    skipped_steps: int = 0
    nonfinite_dense: int = 0  # NaN/Inf dense feature values seen (and replaced) by this run
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early


def task_losses(logits: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
    """Binary cross-entropy per task, averaged over the examples it applies to (label weights
    are zero where a task does not apply). `total_loss` combines them with task weights."""
    out = {}
    for i, (task, z) in enumerate(logits.items()):
        w = batch.label_weights[:, i]
        bce = F.binary_cross_entropy_with_logits(z.float(), batch.labels[:, i], reduction="none")
        out[task] = (w * bce).sum() / w.sum().clamp_min(1.0)
    return out


# CVR's loss is a mean over the few clicked examples of a batch: weighted 0.1 in the total
# (models/README.md, acceptance for learning).
DEFAULT_TASK_WEIGHTS: tuple[tuple[str, float], ...] = (("cvr", 0.1),)


def resolve_task_weights(task_weights, tasks) -> dict[str, float]:
    """{task: weight} for every task of the model; None means ``DEFAULT_TASK_WEIGHTS``."""
    tasks = tuple(tasks)
    if task_weights is None:
        given = {t: w for t, w in DEFAULT_TASK_WEIGHTS if t in tasks}
    else:
        given = dict(task_weights)
        unknown = sorted(set(given) - set(tasks))
        if unknown:
            raise ValueError(f"task_weights name {unknown}, which the model does not have; "
                             f"its tasks are {list(tasks)}.")
    return {t: float(given.get(t, 1.0)) for t in tasks}


def total_loss(losses: dict[str, Tensor], task_weights=None) -> Tensor:
    """Sum of weight x loss over tasks; ``task_weights`` as in `TrainConfig` (None: the defaults)."""
    weights = resolve_task_weights(task_weights, losses)
    return sum(weights[task] * v for task, v in losses.items())


def _autocast_enabled(config: TrainConfig, device: torch.device) -> bool:
    if config.precision == "fp32" or config.autocast == "off":
        return False
    if config.autocast == "on":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def lr_scale(step: int, config: "TrainConfig", optimizer: str = "dense") -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at ``config.steps``.

    The sparse optimizer decays only if ``config.decay_sparse``: row-wise Adagrad already shrinks
    each row's steps as it is touched, and a schedule on top would freeze ids first seen late.
    """
    warm = config.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if config.lr_schedule == "constant" or (optimizer == "sparse" and not config.decay_sparse):
        return 1.0
    progress = min(1.0, (step - warm) / max(config.steps - warm, 1))
    low = config.min_lr_ratio
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Logger:
    """JSONL metrics (rank 0 only)."""

    def __init__(self, out_dir: Path | None, enabled: bool) -> None:
        self.file = open(out_dir / "metrics.jsonl", "a") if out_dir and enabled else None

    def log(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __enter__(self) -> "_Logger":
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()


def _build(config: TrainConfig, model, data, state, ctx: DistContext, resume=None):
    cfg = model.config if model is not None else RankerConfig.from_size(config.size)
    if model is None:
        with torch.random.fork_rng(devices=[]):  # seed the init without resetting the caller's RNG
            torch.manual_seed(config.seed)
            model = Ranker(cfg)
    if data is None:
        data = SyntheticStream(cfg, config.batch_size, seed=config.data_seed,
                               teacher_seed=config.teacher_seed, device=ctx.device,
                               rank=ctx.rank, world_size=ctx.world_size)
    if state is not None:
        load_model_state(model, state, resume)
    elif hasattr(data, "base_rates"):
        model.over.init_bias(data.base_rates())
    precision = Precision.parse(config.precision)  # a plan file is loaded here, once
    # a resumed run was observed when it started; observing its first step here would round it
    # differently from the uninterrupted run's (loka.convert.convert, verify_run)
    convert_result = apply_precision(model, precision, compile=config.compile, verify_run=resume is None)
    model.to(ctx.device)
    # The plan's norm_quant sites: a schema-valid batch (as the inference engine uses), not the
    # stream's first one, so the data position stays what resume expects.
    producers = apply_plan_producers(model, precision, example_batch(cfg, 8).to(ctx.device))
    optimizers = build_optimizers(model, config.lr_dense, config.lr_sparse, config.weight_decay)
    step = 0
    if state is not None:
        load_optimizers(optimizers, state, resume)
        if state.get("stream") is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(state["stream"])
        restore_rng(state)
        step = int(state["step"])
    return model, data, optimizers, step, (convert_result, producers)


def train(config: TrainConfig | None = None, *, model: Ranker | None = None, data=None,
          resume: str | Path | None = None, **overrides) -> TrainResult:
    """Train a ranker; returns the trained model and what was written.

    ``model``: start from this Ranker (default: a fresh one of ``config.size``). ``data``: an
    iterator of `Batch` (default: the synthetic stream; give it ``state_dict``/``load_state_dict``
    to make its position part of checkpoints). ``resume``: a checkpoint to continue from,
    exactly (weights, optimizers, schedule, RNG, data position, precision/plan).
    Keyword overrides replace TrainConfig fields, e.g. ``train(size="tiny", steps=10)``.
    Raises `NonFiniteError` (guards.py) when training meets NaN/Inf under nonfinite="stop".
    """
    config = (config or TrainConfig()).replace(**overrides) if overrides else (config or TrainConfig())
    state = load_checkpoint(resume) if resume else None
    config = config.replace(precision=resume_precision(config.precision, state, resume))
    ctx = init_distributed(config.device, config.dist_timeout_s)
    model, data, optimizers, step, (convert_result, producers) = _build(config, model, data, state, ctx, resume)
    resolve_task_weights(config.task_weights, model.config.tasks)  # unknown task names fail here
    run_id = (state or {}).get("run_id") or new_run_id()
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir and ctx.is_main:
        claim_out_dir(out_dir, run_id, Path(resume) if resume else None, config.overwrite)
        (out_dir / "config.json").write_text(json.dumps(
            {"run_id": run_id, "train": dataclasses.asdict(config), "ranker": model.config.to_dict()},
            indent=2))
    runner = wrap_ddp(model, ctx)
    if config.compile:
        runner = torch.compile(runner)
    result = TrainResult(model=model, step=step, first_step=step, out_dir=out_dir,
                         convert_result=convert_result, producers=producers)
    saver = RunSaver(config, model, optimizers, data, run_id, ctx.is_main, last=resume)
    with StopSignals() as signals, ctx.watch():  # held until checkpoint.pt is written
        _loop(config, runner, data, optimizers, result, ctx, saver, signals)
        result.stopped_by = signals.name
        result.checkpoint = saver.save("checkpoint.pt", result.step)
    if config.eval_examples and ctx.is_main and not result.stopped_by:
        result.evaluation = _final_eval(config, model, ctx, out_dir)
    ctx.barrier()
    return result


def _loop(config, runner, data, optimizers, result: TrainResult, ctx: DistContext,
          saver: RunSaver, signals: StopSignals) -> None:
    with _Logger(result.out_dir, ctx.is_main) as logger, progress_bar(
            total=config.steps, initial=result.step, disable=not (config.progress and ctx.is_main),
            desc="train", unit="step", dynamic_ncols=True) as bar:
        _steps(config, runner, data, optimizers, result, ctx, saver, signals, logger, bar)


def _steps(config, runner, data, optimizers, result: TrainResult, ctx: DistContext, saver: RunSaver,
           signals: StopSignals, logger: "_Logger", bar) -> None:
    autocast = _autocast_enabled(config, ctx.device)
    base_lrs = {"dense": config.lr_dense, "sparse": config.lr_sparse}  # never the restored, scheduled ones
    start, seen, skips_in_a_row = time.perf_counter(), 0, 0
    runner.train()
    while result.step < config.steps:
        timed_out = config.max_seconds is not None and time.perf_counter() - start > config.max_seconds
        if ctx.any_rank(timed_out or signals.signum is not None):
            break
        try:
            batch = next(data).to(ctx.device, non_blocking=True)
        except StopIteration:
            bar.write(f"data ended after step {result.step}; stopping")
            break
        bad_dense = check_batch(batch, result.model.config.tasks)
        if bad_dense:
            report_nonfinite_dense(config.nonfinite_dense, bad_dense, result.step + 1,
                                   first=not result.nonfinite_dense, write=functools.partial(bar.write, file=sys.stderr))
            result.nonfinite_dense += bad_dense
        for name, opt in optimizers.items():
            for g in opt.param_groups:
                g["lr"] = base_lrs[name] * lr_scale(result.step, config, name)
        losses = task_losses(_forward(runner, batch, ctx.device.type, autocast), batch)
        loss = total_loss(losses, config.task_weights)
        loss.backward()
        finite = torch.isfinite(loss.detach()) & grads_finite(result.model)
        loss_value, ok = torch.stack([loss.detach().double(), finite.double()]).tolist()
        if ok:
            for opt in optimizers.values():
                opt.step()
            skips_in_a_row = 0
            saver.rerun = functools.partial(_forward, result.model, batch, ctx.device.type, autocast)
        else:
            rerun = functools.partial(_forward, result.model, batch, ctx.device.type, autocast)
            skips_in_a_row = _nonfinite(config, result, rerun, losses, saver, skips_in_a_row)
            bar.write(f"step {result.step + 1}: NaN/Inf loss or gradient; update skipped")
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        result.step += 1
        seen += batch.size * ctx.world_size
        result.losses.append(loss_value)
        result.examples_per_s = seen / max(time.perf_counter() - start, 1e-9)
        bar.update(1)
        if result.step % config.log_every == 0 or result.step == config.steps:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", ex_s=f"{result.examples_per_s:,.0f}")
            logger.log({"step": result.step, "loss": result.losses[-1],
                        **{f"loss_{k}": float(v.detach()) for k, v in losses.items()},
                        "examples_per_s": result.examples_per_s, "skipped_steps": result.skipped_steps,
                        "nonfinite_dense": result.nonfinite_dense,
                        "elapsed_s": time.perf_counter() - start})
        saver.periodic(result.step)


def _forward(runner, batch: Batch, device_type: str, autocast: bool) -> dict[str, Tensor]:
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        return runner(batch)


def _nonfinite(config, result: TrainResult, rerun, losses, saver: RunSaver, skips_in_a_row: int) -> int:
    """Stop (NonFiniteError) or count a skipped step; returns the new run of skips."""
    where, fatal = diagnose(result.model, losses, rerun)
    last = last_good(saver.last)
    if config.nonfinite == "stop" or fatal or skips_in_a_row + 1 >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteError(
            f"training stopped at step {result.step + 1}: {where}; {last}. Lower the learning "
            "rate, fix the data, or skip such steps with nonfinite='skip' (--on-nonfinite skip).")
    result.skipped_steps += 1
    return skips_in_a_row + 1


def _final_eval(config: TrainConfig, model: Ranker, ctx: DistContext, out_dir: Path | None):
    stream = SyntheticStream(model.config, min(4096, config.eval_examples), seed=config.eval_seed,
                             teacher_seed=config.teacher_seed, device=ctx.device)
    report = evaluate(model, stream, n_examples=config.eval_examples, progress=config.progress)
    if out_dir:
        (out_dir / "eval.json").write_text(json.dumps(report.to_dict(), indent=2))
        report.outputs.save(out_dir / "eval_outputs.npz")
    return report
