"""A frozen rank (SIGSTOP) fails the others in bounded time with an error naming it, instead of
hanging them for the process group's default 30 minutes: within the timeout plus the few
seconds of the who-stopped check (it used to take twice the timeout plus 3 s). Two real gloo
CPU processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from loka.models.distributed import MONITOR_TIMEOUT_S

TIMEOUT_S = 20  # long enough that twice it stands apart from it plus the check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, port: int, out) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loka.app.cli", "train", "--size", "tiny", "--steps", "10000000",
           "--batch-size", "16", "--device", "cpu", "--dist-timeout", str(TIMEOUT_S), "--out", str(out),
           "--eval-examples", "0", "--no-progress", "--log-every", "1", "--checkpoint-every", "0",
           "--checkpoint-minutes", "0", "--threads", "1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("frozen", [1, 0])
def test_a_sigstopped_rank_is_named_within_the_timeout(tmp_path, frozen):
    port = _free_port()
    procs = [_start(rank, port, tmp_path) for rank in (0, 1)]
    survivor = procs[1 - frozen]
    try:
        metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 90
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both ranks are stepping
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                [p.communicate() for p in procs]
            time.sleep(0.05)
        procs[frozen].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = survivor.communicate(timeout=10 * TIMEOUT_S + 30)
        waited = time.monotonic() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.communicate()
    print(f"survivor waited {waited:.1f} s after SIGSTOP: {err.strip().splitlines()[-1]}")
    assert survivor.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert f"rank {frozen} stopped answering" in last and f"{TIMEOUT_S:g} s" in last, err[-2000:]
    # the timeout, the who-stopped check, and 10 s of slack for a loaded machine (the old 2x + 3 s fails)
    assert waited < TIMEOUT_S + MONITOR_TIMEOUT_S + 10, waited
