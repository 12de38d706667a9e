"""Shard the ranker the way production rankers are: tables by TorchRec, dense arches by FSDP2 or DDP.

- Tables: the `TorchRecSparseArch`'s EBC is replaced in place by DMP's sharded EBC (torchrec's
  ``shard`` with an `EmbeddingBagCollectionSharder`), table-wise (each table on one rank, tables
  dealt round-robin by size) or row-wise (every table's rows split over the ranks). The plan is
  made with ``construct_module_sharding_plan`` because torchrec's planner offers row-wise only on
  CUDA. The compute kernel is FBGEMM's fused TBE with ``EXACT_ROWWISE_ADAGRAD``: the update runs
  inside the backward, so the tables have no optimizer of their own in the trainer.
- Dense arches: FSDP2 (``fully_shard`` on each arch: dense, sequence, interaction, over) or DDP
  (the whole model, the sharded tables ignored). Neither renames a module, so every site keeps
  the unwrapped model's fqn and a plan made on one process applies on N.

A single process still runs the sharded code path in a one-rank gloo group, so one process and
N processes train the same model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistContext

TABLE_SHARDINGS = ("table-wise", "row-wise")
DENSE_PARALLEL = ("fsdp2", "ddp")
DENSE_ARCHES = ("dense", "sequence", "interaction", "over")
TABLE_COMMS = ("fp32", "fp16", "bf16")  # FP8 comms need fbgemm's CUDA build


@dataclass(frozen=True)
class ShardingConfig:
    """How tables and dense arches are distributed (see the module docstring).

    tables: "table-wise" | "row-wise". dense: "fsdp2" | "ddp". dense_optimizer: "adamw" (the
    trainer's recipe) | "sgd" (plain SGD, for exactness checks across world sizes).
    fp8_all_gather: under FSDP2 with precision "fp8", all-gather the FP8 sites' weights in FP8
    (torchao's float8 weight wrapper) instead of in high precision.
    table_comms: precision of the tables' pooled embeddings and their gradients in the
    all-to-all / reduce-scatter ("fp32", or "fp16"/"bf16": torchrec's quantized comms, half the bytes).
    """

    tables: str = "table-wise"
    dense: str = "fsdp2"
    dense_optimizer: str = "adamw"
    fp8_all_gather: bool = False
    adagrad_eps: float = 1e-8
    table_comms: str = "fp32"

    def __post_init__(self) -> None:
        if self.tables not in TABLE_SHARDINGS:
            raise ValueError(f"tables={self.tables!r}: choose one of {TABLE_SHARDINGS}.")
        if self.dense not in DENSE_PARALLEL:
            raise ValueError(f"dense={self.dense!r}: choose one of {DENSE_PARALLEL}.")
        if self.dense_optimizer not in ("adamw", "sgd"):
            raise ValueError(f"dense_optimizer={self.dense_optimizer!r}: choose 'adamw' or 'sgd'.")
        if self.fp8_all_gather and self.dense != "fsdp2":
            raise ValueError("fp8_all_gather needs dense='fsdp2' (DDP all-reduces gradients and gathers no weights).")
        if self.table_comms not in TABLE_COMMS:
            raise ValueError(f"table_comms={self.table_comms!r}: choose one of {TABLE_COMMS} (FP8 comms need a GPU build).")
        if not self.adagrad_eps > 0:
            raise ValueError(f"adagrad_eps={self.adagrad_eps} must be > 0.")


def ensure_process_group(ctx: DistContext) -> None:
    """A one-rank group for a single process (torchrec's sharded modules need a group): gloo on
    CPU, nccl on CUDA, as `init_distributed` picks for several ranks."""
    if not dist.is_initialized():
        if ctx.world_size != 1:
            raise ValueError("a multi-rank run needs its process group first (init_distributed).")
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def table_placement(sizes: list[int], world: int) -> list[int]:
    """Table-wise: the rank of each table, largest tables first, each to the least-loaded rank."""
    load, ranks = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=lambda k: (load[k], k))
        ranks[i], load[r] = r, load[r] + sizes[i]
    return ranks


def shard_tables(model: nn.Module, sharding: ShardingConfig, lr: float, ctx: DistContext):
    """Replace ``model.sparse.ebc`` by its sharded form; returns the torchrec module plan."""
    # optional heavy dependency: torchrec and fbgemm (~4 s to import)
    from fbgemm_gpu.split_embedding_configs import EmbOptimType  # optional: torchrec (extra)
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel  # optional: torchrec (extra)
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # optional: torchrec (extra)
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry  # optional: torchrec (extra)
    from torchrec.distributed.shard import shard  # optional: torchrec (extra)
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise  # optional: torchrec (extra)
    from torchrec.distributed.types import ShardingEnv  # optional: torchrec (extra)

    ensure_process_group(ctx)
    ebc = model.sparse.ebc
    comms = CommType(sharding.table_comms)
    codecs = None if comms == CommType.FP32 else get_qcomm_codecs_registry(
        QCommsConfig(forward_precision=comms, backward_precision=comms))
    sharder = EmbeddingBagCollectionSharder(fused_params={
        "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": lr, "eps": sharding.adagrad_eps},
        qcomm_codecs_registry=codecs)
    kernel = EmbeddingComputeKernel.FUSED.value
    names = [c.name for c in ebc.embedding_bag_configs()]
    if sharding.tables == "table-wise":
        ranks = table_placement([c.num_embeddings for c in ebc.embedding_bag_configs()], ctx.world_size)
        per_table = {n: table_wise(rank=r, compute_kernel=kernel) for n, r in zip(names, ranks)}
    else:
        per_table = {n: row_wise(compute_kernel=kernel) for n in names}
    plan = construct_module_sharding_plan(ebc, per_table, sharder=sharder, local_size=ctx.world_size,
                                          world_size=ctx.world_size, device_type=ctx.device.type)
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    full = {k: v.detach().clone() for k, v in ebc.state_dict().items()}
    model.sparse.ebc = shard(ebc, plan, env, ctx.device, sharder)
    load_full_tables(model.sparse.ebc, full)
    return plan


@torch.no_grad()
def load_full_tables(sharded_ebc: nn.Module, full: dict) -> None:
    """Copy whole tables {state-dict key: [rows, D]} into this rank's shards (sharding makes new
    tables; this keeps the unsharded model's values)."""
    for key, value in sharded_ebc.state_dict().items():
        for piece in value.local_shards():
            (r0, c0), (rows, cols) = piece.metadata.shard_offsets, piece.metadata.shard_sizes
            piece.tensor.copy_(full[key][r0:r0 + rows, c0:c0 + cols])


def plan_text(plan, tables=()) -> str:
    """One line per table: rows and features (from ``tables``, torchrec table configs), sharding
    type, kernel and ranks."""
    about = {t.name: f" ({t.num_embeddings} rows: {', '.join(t.feature_names)})" for t in tables}
    rows = [f"{name}{about.get(name, '')}: {p.sharding_type} {p.compute_kernel} ranks={p.ranks}"
            for name, p in plan.items()]
    return "\n".join(rows)


def sparse_optimizer(model: nn.Module):
    """The sharded EBC's fused optimizer (its ``lr`` applies from the next backward on)."""
    return model.sparse.ebc.fused_optimizer


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter outside the sparse arch."""
    return [p for n, p in model.named_parameters() if not n.startswith("sparse.") and p.requires_grad]


def wrap_dense(model: nn.Module, sharding: ShardingConfig, ctx: DistContext, param_dtype=None,
               own_units: tuple[str, ...] = ()) -> nn.Module:
    """FSDP2 on each dense arch (returns ``model``) or DDP on the model (returns the DDP runner).

    ``param_dtype``: FSDP2's all-gather/compute dtype for parameters (None: as stored).
    ``own_units``: fqns of modules that get an FSDP2 unit (one all-gather) of their own, e.g. the
    FP8 sites, so their all-gathers can be counted apart.
    """
    if sharding.dense == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # heavy: FSDP2, only for sharded runs

        policy = MixedPrecisionPolicy(param_dtype=param_dtype)
        for fqn in own_units:
            fully_shard(model.get_submodule(fqn), mp_policy=policy, reshard_after_forward=True)
        for name in DENSE_ARCHES:
            arch = getattr(model, name, None)
            if arch is not None:
                fully_shard(arch, mp_policy=policy, reshard_after_forward=True)
        return model
    from torch.nn.parallel import DistributedDataParallel  # heavy: DDP, only for sharded runs

    ignore = [n for n, _ in model.named_parameters() if n.startswith("sparse.")]
    ignore += [n for n, _ in model.named_buffers() if n.startswith("sparse.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(model)


def build_dense_optimizer(model: nn.Module, sharding: ShardingConfig, lr: float,
                          weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decay on matrices only, as the trainer's) or plain SGD over the dense parameters."""
    params = dense_parameters(model)
    if sharding.dense_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, foreach=False)


def count_all_gathers(model: nn.Module, fqns) -> dict[str, list[int]]:
    """Count the bytes FSDP2 all-gathers for each module of ``fqns`` (each its own FSDP2 unit):
    {fqn: [bytes sent by this rank per all-gather call]}, filled as the model runs. The count is
    taken at the process-group call (each call's input buffer), not estimated from shapes."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather  # optional: a private torch module, absent in some versions

    class _Counting(DefaultAllGather):
        def __init__(self, sink: list[int]) -> None:
            super().__init__()
            self.sink = sink

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            self.sink.append(input_tensor.numel() * input_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, group, async_op)

    counts: dict[str, list[int]] = {}
    for fqn in fqns:
        counts[fqn] = []
        model.get_submodule(fqn).set_custom_all_gather(_Counting(counts[fqn]))
    return counts
