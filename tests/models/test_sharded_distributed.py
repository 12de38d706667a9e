"""Two gloo processes, spawned once, run every sharded layout; the main process runs the
one-process references on the same global data and compares.

Checked: TorchRec table-wise and row-wise tables with FSDP2 (and table-wise with DDP) train
exactly as one process on both ranks' examples (SGD, 20 steps, 1e-6 relative); site names under
the wrappers are the unwrapped model's; FP8 sites under FSDP2 all-gather their weights in FP8
(bytes counted at the process-group call) at <= 0.55x the bf16 bytes, with the same losses as
FP8 gathered in high precision.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loka.models.batch import Batch
from loka.models.config import RankerConfig
from loka.models.synthetic import SyntheticStream
from loka.models.train import TrainConfig, TrainResult

pytest.importorskip("torchrec", reason="torchrec not installed (scripts/setup.sh installs it)")

from loka.models.distributed import init_distributed  # noqa: E402
from loka.models.ranker import Ranker  # noqa: E402
from loka.models.sharded_train import build_sharded, fp8_sites, run_steps  # noqa: E402
from loka.models.sharding import ShardingConfig, build_dense_optimizer, count_all_gathers  # noqa: E402

BATCH = 16
SGD = TrainConfig(size="tiny", steps=20, batch_size=BATCH, precision="fp32", lr_dense=0.05, progress=False)
FP8 = SGD.replace(steps=4, precision="fp8")
RUNS = {  # name: (train config, sharding, FSDP2 all-gather dtype)
    "table-wise/fsdp2": (SGD, ShardingConfig("table-wise", "fsdp2", "sgd"), None),
    "row-wise/fsdp2": (SGD, ShardingConfig("row-wise", "fsdp2", "sgd"), None),
    "table-wise/ddp": (SGD, ShardingConfig("table-wise", "ddp", "sgd"), None),
    "fp8/fp8-gather": (FP8, ShardingConfig("row-wise", "fsdp2", "sgd", fp8_all_gather=True), None),
    "fp8/fp32-gather": (FP8, ShardingConfig("row-wise", "fsdp2", "sgd"), None),
    "fp8/bf16-gather": (FP8.replace(steps=1), ShardingConfig("row-wise", "fsdp2", "sgd"), torch.bfloat16),
    "fp8/fp8-gather-bf16": (FP8.replace(steps=1), ShardingConfig("row-wise", "fsdp2", "sgd", fp8_all_gather=True),
                            torch.bfloat16),
}


def _run(config: TrainConfig, sharding: ShardingConfig, param_dtype, data, world: int) -> dict:
    ctx = init_distributed("cpu")
    model, runner, plan, sites = build_sharded(config, sharding, ctx, base_rates=data.base_rates,
                                               param_dtype=param_dtype)
    counts = count_all_gathers(model, sites) if sharding.dense == "fsdp2" else {}
    result = TrainResult(model=model, step=0, first_step=0)
    run_steps(config, runner, model, data, build_dense_optimizer(model, sharding, config.lr_dense, 0.0),
              result, ctx)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Float8" in type(m).__name__)
    return {"losses": result.losses, "sites": sites, "linears": linears,
            "all_gather_bytes": {k: sum(v) for k, v in counts.items()},
            "plan": {k: [p.sharding_type, p.ranks] for k, p in plan.items()}}


class _RankData:
    """Rank ``rank`` of ``world``'s slice of each global step: the synthetic stream's batch
    ``world * step + rank``; world 1 with ``of`` ranks reads them all, concatenated."""

    def __init__(self, cfg: RankerConfig, rank: int, world: int, of: int) -> None:
        self.stream = SyntheticStream(cfg, BATCH, seed=7, teacher_seed=7)
        self.rank, self.world, self.of, self.step = rank, world, of, 0
        self.base_rates = self.stream.base_rates()

    def __next__(self) -> Batch:
        first = self.of * self.step
        self.step += 1
        if self.world == 1:
            return Batch.cat([self.stream.batch(first + r) for r in range(self.of)])
        return self.stream.batch(first + self.rank)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    cfg = RankerConfig.from_size("tiny")
    results = {name: _run(config, sharding, dtype, _RankData(cfg, rank, world, world), world)
               for name, (config, sharding, dtype) in RUNS.items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process():
    """The same runs in this process, one rank reading both ranks' examples each step (not the
    FP8 ones: their dynamic activation scales are per rank's batch, so they differ by design)."""
    cfg = RankerConfig.from_size("tiny")
    try:
        return {name: _run(config, sharding, dtype, _RankData(cfg, 0, 1, 2), 1)
                for name, (config, sharding, dtype) in RUNS.items() if not name.startswith("fp8/")}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["table-wise/fsdp2", "row-wise/fsdp2", "table-wise/ddp"])
def test_two_ranks_train_as_one_process(two_ranks, one_process, name):
    got, want = torch.tensor(two_ranks[0][name]["losses"]), torch.tensor(one_process[name]["losses"])
    assert len(got) == SGD.steps and torch.equal(got, torch.tensor(two_ranks[1][name]["losses"]))
    assert got[-1] != got[0]  # it trained
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.distributed
def test_the_plan_shards_as_asked_and_site_names_stay_unwrapped(two_ranks):
    plans = {name: two_ranks[0][name]["plan"] for name in ("table-wise/fsdp2", "row-wise/fsdp2")}
    assert {(kind, tuple(ranks)) for kind, ranks in plans["table-wise/fsdp2"].values()} == {
        ("table_wise", (0,)), ("table_wise", (1,))}
    assert all(kind == "row_wise" and ranks == [0, 1] for kind, ranks in plans["row-wise/fsdp2"].values())
    unwrapped = sorted(n for n, m in Ranker(RankerConfig.from_size("tiny")).named_modules()
                       if isinstance(m, torch.nn.Linear))
    for name in ("table-wise/fsdp2", "table-wise/ddp", "fp8/fp8-gather"):
        assert two_ranks[0][name]["linears"] == unwrapped
    assert two_ranks[0]["fp8/fp8-gather"]["sites"] == sorted(fp8_sites(Ranker(RankerConfig.from_size("tiny"))))


@pytest.mark.distributed
def test_fp8_all_gather_moves_about_half_the_bf16_bytes_with_the_same_losses(two_ranks):
    """Bytes: FP8 weights (biases and the rest of the unit in bf16) against the same sites
    gathered in bf16, both under bf16 mixed precision. Losses: FP8 gathered in FP8 against FP8
    gathered in fp32 (the cast moves before the gather; its scale is the whole weight's amax)."""
    runs = ("fp8/fp8-gather-bf16", "fp8/bf16-gather", "fp8/fp8-gather", "fp8/fp32-gather")
    for rank in two_ranks:
        per_step = {k: sum(rank[k]["all_gather_bytes"].values()) / RUNS[k][0].steps for k in runs}
        assert rank["fp8/fp8-gather"]["sites"] and per_step["fp8/bf16-gather"] > 0
        print({k: f"{v:.0f} B/step" for k, v in per_step.items()})
        assert per_step["fp8/fp8-gather-bf16"] <= 0.55 * per_step["fp8/bf16-gather"]
        assert per_step["fp8/fp32-gather"] == 2 * per_step["fp8/bf16-gather"]
    fp8, hp = (torch.tensor(two_ranks[0][k]["losses"]) for k in ("fp8/fp8-gather", "fp8/fp32-gather"))
    torch.testing.assert_close(fp8, hp, rtol=1e-6, atol=0)
