"""2-process gloo test: the plan made on rank 0 arrives intact on rank 1."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from loka.dispatch import GemmChoice, Plan, SitePlan
from loka.dispatch.distributed import broadcast_plan


def _plan() -> Plan:
    fp8 = GemmChoice("scaled_mm", "rowwise", reason="test", bf16_ms=1.0, planned_ms=0.5)
    return Plan(sites=[SitePlan("a", 64, 32, 16, {"fprop": fp8, "dgrad": fp8, "wgrad": GemmChoice(reason="kept")})],
                budget={"max_model_ne_delta": 2e-4}, device={"name": "test", "representative": True})


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = broadcast_plan(_plan() if rank == 0 else None)
        with open(os.path.join(out_dir, f"plan{rank}.json"), "w") as f:
            f.write(got.to_json())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_broadcast_plan_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    texts = [(tmp_path / f"plan{r}.json").read_text() for r in (0, 1)]
    assert texts[0] == texts[1] == _plan().to_json()


def test_broadcast_without_process_group_returns_the_plan():
    p = _plan()
    assert broadcast_plan(p) is p
    with pytest.raises(ValueError, match="needs a plan"):
        broadcast_plan(None)
