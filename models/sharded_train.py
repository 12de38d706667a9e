"""Sharded training: the ranker with TorchRec-sharded tables and FSDP2/DDP dense arches.

`train_sharded(TrainConfig(...), ShardingConfig(...))` runs the trainer's recipe (schedule,
task weights, seeds) on the layout `loka.models.sharding` builds, one process or N under
``torchrun`` (``loka train --nproc N --tables row-wise``). Each rank reads its own slice of the
stream, and the step's loss is the *global* one: each task's loss is the sum over all ranks'
examples divided by the all-reduced label weight, so N ranks of B examples train exactly as one
process on those N x B examples (the gradient averaging of FSDP2/DDP and of torchrec's
all-to-all undo the factor N each rank's loss carries).

The dense optimizer is AdamW (or SGD, for exactness checks); the tables are updated by FBGEMM's
fused row-wise Adagrad inside the backward, its learning rate set before each step.
Precision: "fp32"/"bf16" (the parameters as stored; CPU runs no autocast), "fp8", torchao's
float8 training on every Linear whose dims are multiples of 16 (the FP8 sites), whose weights
FSDP2 all-gathers in FP8 with ``ShardingConfig.fp8_all_gather``, or a loka plan file, applied to
each rank's unwrapped model before sharding (site names are the same on 1 and N processes).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from .batch import Batch
from .comm_bytes import CommBytes
from .config import RankerConfig
from .distributed import DistContext, init_distributed
from .precision import HP_PRECISIONS, Precision, apply_precision, plan_producers
from .guards import NonFiniteError
from .ranker import Ranker
from .run_dir import StopSignals
from .sharded_checkpoint import load_sharded, save_sharded
from .sharding import (ShardingConfig, build_dense_optimizer, plan_text, shard_tables, sparse_optimizer,
                       wrap_dense)
from .synthetic import SyntheticStream
from .torchrec_sparse import table_configs, use_torchrec_sparse
from .train import TrainConfig, TrainResult, lr_scale, resolve_task_weights


@dataclass
class ShardedResult(TrainResult):
    """`TrainResult` plus, when counted, the bytes this rank sent per step per collective."""

    comm_bytes: dict[str, float] = field(default_factory=dict)


def global_task_losses(logits: dict[str, Tensor], batch: Batch, world_size: int) -> tuple[dict, dict]:
    """(loss to differentiate on this rank, global loss to report), each {task: scalar}.

    Each task's loss is sum(w * bce) over every rank's examples / sum(w) over every rank; the
    differentiated one is this rank's share times ``world_size``, since gradients are averaged.
    """
    bce = [F.binary_cross_entropy_with_logits(z.float(), batch.labels[:, i], reduction="none")
           for i, z in enumerate(logits.values())]  # each [B]
    # float64 sums: the reported loss then rounds the same whatever the number of ranks adding it up
    sums = torch.stack([(batch.label_weights[:, i].double() * v.double()).sum() for i, v in enumerate(bce)])
    stats = torch.cat([batch.label_weights.double().sum(0), sums.detach()])  # [2 * n_tasks] float64
    if world_size > 1:
        dist.all_reduce(stats)
    n = len(logits)
    weight = stats[:n].clamp_min(1.0)
    local = sums * world_size / weight
    reported = stats[n:] / weight
    return dict(zip(logits, local)), dict(zip(logits, reported))


def fp8_sites(model: nn.Module) -> list[str]:
    """Linear sites torchao's float8 training takes: both dims multiples of 16, outside the tables."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("sparse.")
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def to_float8(model: nn.Module, fp8_all_gather: bool) -> list[str]:
    """torchao float8 training at `fp8_sites` (tensorwise dynamic scaling); returns the sites."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional: torchao may be absent

    sites = set(fp8_sites(model))
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fp8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in sites)
    return sorted(sites)


def build_sharded(config: TrainConfig, sharding: ShardingConfig, ctx: DistContext, model: Ranker | None = None,
                  base_rates: Tensor | None = None, param_dtype=None):
    """The sharded model, its runner (the DDP wrapper or the model), the table plan and the FP8 sites."""
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = Ranker(RankerConfig.from_size(config.size))
        if base_rates is not None:
            model.over.init_bias(base_rates)
    use_torchrec_sparse(model)
    sites = []
    if config.precision == "fp8":
        sites = to_float8(model, sharding.fp8_all_gather)
    elif config.precision not in (None, *HP_PRECISIONS):  # a loka plan, made on the unwrapped model
        precision = Precision.parse(config.precision)  # the plan file is loaded here, once
        if plan_producers(precision) is not None:
            raise ValueError("a plan with norm_quant producer sites is not applied to sharded runs yet; "
                             "re-plan without --producers or train without --tables.")
        apply_precision(model, precision)
    model.to(ctx.device)
    plan = shard_tables(model, sharding, config.lr_sparse, ctx)
    runner = wrap_dense(model, sharding, ctx, param_dtype, own_units=tuple(sites))
    return model, runner, plan, sites


def train_sharded(config: TrainConfig, sharding: ShardingConfig | None = None, *, model: Ranker | None = None,
                  data=None, print_plan: bool = True, count_comms: bool = False, resume: str | Path | None = None,
                  save: str | Path | None = None) -> ShardedResult:
    """Train with sharded tables and FSDP2/DDP dense arches; ``losses`` are the global step losses.

    ``model``: an unwrapped `Ranker` with the pure-PyTorch sparse arch (its tables are copied into
    the EBC); default a fresh one of ``config.size`` seeded by ``config.seed``. ``data``: this
    rank's iterator of `Batch` (default: its slice of the synthetic stream). ``count_comms``:
    fill ``comm_bytes`` with the bytes sent per step per collective (`CommBytes`; slows CPU steps).
    ``resume``: a DCP checkpoint directory of `save_sharded` (any world size) to continue from;
    the default stream continues at the checkpoint's step. ``save``: write one there at the end,
    also when SIGTERM/SIGINT ended the run early (``stopped_by``).
    """
    sharding = sharding or ShardingConfig()
    ctx = init_distributed(config.device, config.dist_timeout_s)
    cfg = model.config if model is not None else RankerConfig.from_size(config.size)
    stream = None
    if data is None:
        data = stream = SyntheticStream(cfg, config.batch_size, seed=config.data_seed, teacher_seed=config.teacher_seed,
                                        device=ctx.device, rank=ctx.rank, world_size=ctx.world_size)
    model, runner, plan, _ = build_sharded(config, sharding, ctx, model,
                                           stream.base_rates() if stream is not None else None)
    resolve_task_weights(config.task_weights, cfg.tasks)
    if print_plan and ctx.is_main:
        tables = table_configs(model.config)
        print(f"table sharding ({sharding.tables}, {ctx.world_size} rank(s)):\n{plan_text(plan, tables)}", flush=True)
    dense_opt = build_dense_optimizer(model, sharding, config.lr_dense, config.weight_decay)
    result = ShardedResult(model=model, step=0, first_step=0)
    if resume is not None:
        result.step = result.first_step = load_sharded(resume, model, dense_opt)
        if stream is not None:
            stream.position = result.step
    with StopSignals() as signals, ctx.watch(), (CommBytes() if count_comms else nullcontext()) as comms:
        run_steps(config, runner, model, data, dense_opt, result, ctx, signals=signals)
    result.stopped_by = signals.name
    if comms is not None:
        result.comm_bytes = comms.per_step(result.step - result.first_step)
    if save is not None:
        result.checkpoint = save_sharded(save, model, dense_opt, result.step)
    ctx.barrier()
    return result


def run_steps(config: TrainConfig, runner, model: nn.Module, data, dense_opt, result: TrainResult,
              ctx: DistContext, stop_at: int | None = None, signals: StopSignals | None = None) -> None:
    """Optimizer steps from ``result.step`` to ``stop_at`` (default ``config.steps``, where the
    schedule ends), appending global losses; every rank stops after the step in which any got
    ``signals``. A NaN/Inf global loss raises `NonFiniteError` before its backward, whose fused
    table update could not be taken back."""
    sparse_opt = sparse_optimizer(model)
    weights = resolve_task_weights(config.task_weights, model.config.tasks)
    start, seen = time.perf_counter(), 0
    runner.train()
    while result.step < (config.steps if stop_at is None else stop_at):
        if signals is not None and ctx.any_rank(signals.signum is not None):
            break
        batch = next(data).to(ctx.device)
        for g in dense_opt.param_groups:
            g["lr"] = config.lr_dense * lr_scale(result.step, config, "dense")
        for g in sparse_opt.param_groups:
            g["lr"] = config.lr_sparse * lr_scale(result.step, config, "sparse")
        sparse_opt.zero_grad()  # hands the lr to the fused kernel before this step's backward
        local, reported = global_task_losses(runner(batch), batch, ctx.world_size)
        total = float(sum(weights[t] * v for t, v in reported.items()))
        if not math.isfinite(total):
            raise NonFiniteError(f"training stopped at step {result.step + 1}: the global loss is {total} "
                                 f"({', '.join(f'{t}={float(v)}' for t, v in reported.items())}); no update was "
                                 "applied for it. Lower the learning rates or fix the data.")
        sum(weights[t] * v for t, v in local.items()).backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)
        result.step += 1
        result.losses.append(total)
        seen += batch.size * ctx.world_size
        result.examples_per_s = seen / max(time.perf_counter() - start, 1e-9)
