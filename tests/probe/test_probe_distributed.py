"""2-process gloo test: statistics merged across ranks equal one process seeing both halves.

Each rank runs its half of every batch; the single process runs both halves as two
micro-batches of the same step (which is what a DDP rank's shard is).
"""

import os
import pickle
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

from loka.probe import Probe, ProbeConfig, SamplingSchedule  # noqa: E402
from probe_toy import ToyMLP, loss_fn, make_batch  # noqa: E402

STEPS = 2
CFG = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=STEPS), candidates=("tensorwise",),
                  stop_when_decided=False, fit_values=0)


def _halves(step):
    x, y = make_batch(step, batch_size=64)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def _run(probe, model, shards):
    for step in range(STEPS):
        with probe.step(step):
            for shard in shards(step):
                loss_fn(model, shard).backward()
            model.zero_grad()


def _summary(probe):
    out = {}
    for fqn, st in probe.state.items():
        out[fqn] = {"operands": {r: s.summary() for r, s in st.operands.items()},
                    "errors": {g: t.rel_errors for g, t in st.errors["tensorwise"].items()},
                    "m": sorted(st.m_values), "micro_batches": st.micro_batches}
    return out


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = ToyMLP()
        probe = Probe(model, CFG)
        _run(probe, model, lambda step: [_halves(step)[rank]])
        probe.reduce()
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump(_summary(probe), f)
        probe.close()  # the analysis worker thread ends before the process group and the interpreter do
    finally:
        dist.destroy_process_group()
    # About 1 run in 10 a rank then died of SIGABRT ("terminate called without an active
    # exception") after the interpreter had finalised (faulthandler: no Python frame left), i.e.
    # in C++ static destructors at process exit, after every result was written. Leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


@pytest.mark.distributed
def _spawn_ranks(out) -> None:
    """Both ranks; one retry, with a warning, when a rank aborts (SIGABRT).

    Known open problem: a rank sometimes died of SIGABRT ("terminate called without an active
    exception") at process exit, after finalisation (see _worker, which now skips the C++
    exit path); should it happen anyway, a retry keeps the merge's assertions below, and a
    second abort fails the test.
    """
    try:
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException as exc:
        if exc.signal_name != "SIGABRT":
            raise
        warnings.warn(f"a gloo rank aborted ({exc}); retrying once (see _spawn_ranks)", stacklevel=2)
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)


def test_gloo_merge_equals_one_process_seeing_both_halves(tmp_path):
    out = tmp_path / "rank0.pkl"
    _spawn_ranks(out)
    with open(out, "rb") as f:
        merged = pickle.load(f)
    torch.manual_seed(0)
    model = ToyMLP()
    single = Probe(model, CFG)
    _run(single, model, _halves)
    expected = _summary(single)
    # saturation_delayed compares with the *previous step's* amax, which each rank knows
    # only for its own shard (as delayed scaling does unless amax is all-reduced).
    for d in (merged, expected):
        for site in d.values():
            for s in site["operands"].values():
                s.pop("saturation_delayed", None)
    _assert_close(merged, expected)
    assert merged["inp"]["micro_batches"] == 2 * STEPS
