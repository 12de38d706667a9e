"""Train the ranker: `loka.models.train(TrainConfig(...))`, or `loka train` on the command line.

AdamW for the dense parameters and row-wise Adagrad for the embedding tables; bf16 autocast
where the device supports it; precision bf16 / fp8 / a loka plan (see `precision.py`);
a tqdm bar with loss and examples/s; a JSONL metrics log; checkpoints that resume exactly
(model, optimizers, stream position, step). Under ``torchrun --nproc_per_node=N`` the same
function runs data-parallel (DDP; gloo on CPU, nccl on CUDA), each rank reading its own
slice of the stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from .batch import Batch
from .checkpoint import load_checkpoint, save_checkpoint
from .config import SIZES, RankerConfig
from .distributed import DistContext, init_distributed, wrap_ddp
from .evaluate import evaluate
from .optim import build_optimizers
from .precision import apply_precision, check_precision
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
    precision: "bf16" | "fp32" | "fp8" | path to a loka plan JSON. autocast: "auto" (bf16 on
    devices that support it fast, i.e. CUDA with bf16; off on CPU), "on" or "off".
    out_dir: where metrics.jsonl, checkpoints and eval results go (None: nothing written).
    max_seconds: stop early once training has run this long (the step reached is reported).
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
    precision: str = "bf16"
    autocast: str = "auto"
    seed: int = 0
    data_seed: int = 0
    teacher_seed: int = 0
    device: str = "auto"
    compile: bool = False
    out_dir: str | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    eval_examples: int = 0
    eval_seed: int = 1_000_003
    max_seconds: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.size not in SIZES and self.size != "custom":
            raise ValueError(f"size={self.size!r} is unknown; choose one of {sorted(SIZES)}.")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 1.")
        if self.lr_dense <= 0 or self.lr_sparse <= 0:
            raise ValueError("Learning rates must be > 0.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError("lr_schedule must be 'constant' or 'cosine' (decays to min_lr_ratio at `steps`).")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1].")
        if self.autocast not in ("auto", "on", "off"):
            raise ValueError("autocast must be 'auto', 'on' or 'off'.")
        if self.checkpoint_every < 0 or self.eval_examples < 0 or self.warmup_steps < 0:
            raise ValueError("checkpoint_every, eval_examples and warmup_steps must be >= 0.")
        if self.task_weights is not None:
            pairs = [tuple(p) for p in self.task_weights]
            if any(len(p) != 2 or not isinstance(p[0], str) or not float(p[1]) >= 0 for p in pairs):
                raise ValueError(f"task_weights={self.task_weights!r} must be (task, weight) pairs with "
                                 "weight >= 0, e.g. (('cvr', 0.1),).")
            object.__setattr__(self, "task_weights", tuple((t, float(w)) for t, w in pairs))
        check_precision(self.precision)

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


def _lr_scale(step: int, config: "TrainConfig", optimizer: str = "dense") -> float:
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

    def close(self) -> None:
        if self.file:
            self.file.close()


def _build(config: TrainConfig, model, data, resume, ctx: DistContext):
    cfg = model.config if model is not None else RankerConfig.from_size(config.size)
    if model is None:
        with torch.random.fork_rng(devices=[]):  # seed the init without resetting the caller's RNG
            torch.manual_seed(config.seed)
            model = Ranker(cfg)
    if data is None:
        data = SyntheticStream(cfg, config.batch_size, seed=config.data_seed,
                               teacher_seed=config.teacher_seed, device=ctx.device,
                               rank=ctx.rank, world_size=ctx.world_size)
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
    elif hasattr(data, "base_rates"):
        model.over.init_bias(data.base_rates())
    convert_result = apply_precision(model, config.precision)
    model.to(ctx.device)
    optimizers = build_optimizers(model, config.lr_dense, config.lr_sparse, config.weight_decay)
    step = 0
    if state is not None:
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if state.get("stream") is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(state["stream"])
        step = int(state["step"])
    return model, data, optimizers, step, convert_result


def train(config: TrainConfig | None = None, *, model: Ranker | None = None, data=None,
          resume: str | Path | None = None, **overrides) -> TrainResult:
    """Train a ranker; returns the trained model and what was written.

    ``model``: start from this Ranker (default: a fresh one of ``config.size``). ``data``: an
    iterator of `Batch` (default: the synthetic stream; give it ``state_dict``/``load_state_dict``
    to make its position part of checkpoints). ``resume``: a checkpoint to continue from.
    Keyword overrides replace TrainConfig fields, e.g. ``train(size="tiny", steps=10)``.
    """
    config = (config or TrainConfig()).replace(**overrides) if overrides else (config or TrainConfig())
    ctx = init_distributed(config.device)
    model, data, optimizers, step, convert_result = _build(config, model, data, resume, ctx)
    resolve_task_weights(config.task_weights, model.config.tasks)  # unknown task names fail here
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(
            {"train": dataclasses.asdict(config), "ranker": model.config.to_dict()}, indent=2))
    runner = wrap_ddp(model, ctx)
    if config.compile:
        runner = torch.compile(runner)
    result = TrainResult(model=model, step=step, first_step=step, out_dir=out_dir,
                         convert_result=convert_result)
    _loop(config, runner, data, optimizers, result, ctx)
    if out_dir and ctx.is_main:
        result.checkpoint = save_checkpoint(
            out_dir / "checkpoint.pt", model, optimizers, _stream_state(data), result.step,
            dataclasses.asdict(config), config.precision)
    if config.eval_examples and ctx.is_main:
        result.evaluation = _final_eval(config, model, ctx, out_dir)
    ctx.barrier()
    return result


def _stream_state(data) -> dict | None:
    return data.state_dict() if hasattr(data, "state_dict") else None


def _loop(config, runner, data, optimizers, result: TrainResult, ctx: DistContext) -> None:
    autocast = _autocast_enabled(config, ctx.device)
    logger = _Logger(result.out_dir, ctx.is_main)
    bar = tqdm(total=config.steps, initial=result.step, disable=not (config.progress and ctx.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in optimizers.items()}
    start, seen = time.perf_counter(), 0
    runner.train()
    while result.step < config.steps:
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            break
        try:
            batch = next(data).to(ctx.device, non_blocking=True)
        except StopIteration:
            bar.write(f"data ended after step {result.step}; stopping")
            break
        for name, opt in optimizers.items():
            for g, lr in zip(opt.param_groups, base_lrs[name]):
                g["lr"] = lr * _lr_scale(result.step, config, name)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = task_losses(runner(batch), batch)
        loss = total_loss(losses, config.task_weights)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        result.step += 1
        seen += batch.size * ctx.world_size
        result.losses.append(float(loss.detach()))
        result.examples_per_s = seen / max(time.perf_counter() - start, 1e-9)
        bar.update(1)
        if result.step % config.log_every == 0 or result.step == config.steps:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", ex_s=f"{result.examples_per_s:,.0f}")
            logger.log({"step": result.step, "loss": result.losses[-1],
                        **{f"loss_{k}": float(v.detach()) for k, v in losses.items()},
                        "examples_per_s": result.examples_per_s,
                        "elapsed_s": time.perf_counter() - start})
        if (config.checkpoint_every and result.step % config.checkpoint_every == 0
                and result.out_dir and ctx.is_main):
            save_checkpoint(result.out_dir / f"checkpoint_{result.step:07d}.pt",
                            result.model, optimizers, _stream_state(data),
                            result.step, dataclasses.asdict(config), config.precision)
    bar.close()
    logger.close()


def _final_eval(config: TrainConfig, model: Ranker, ctx: DistContext, out_dir: Path | None):
    stream = SyntheticStream(model.config, min(4096, config.eval_examples), seed=config.eval_seed,
                             teacher_seed=config.teacher_seed, device=ctx.device)
    report = evaluate(model, stream, n_examples=config.eval_examples, progress=config.progress)
    if out_dir:
        (out_dir / "eval.json").write_text(json.dumps(report.to_dict(), indent=2))
        report.outputs.save(out_dir / "eval_outputs.npz")
    return report
