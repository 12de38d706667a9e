"""No lost work: periodic checkpoints by default (steps and minutes), rotated, durable, a
checkpoint on SIGTERM/SIGINT (a real process and a real signal), stale temp files removed,
and another run's directory never written over without overwrite."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loka.models import RankerConfig, SyntheticStream, TrainConfig, load_checkpoint, train
from loka.models.checkpoint import write_atomic
from loka.models.cli import register

FAST = dict(size="tiny", batch_size=16, progress=False, warmup_steps=0, lr_schedule="constant",
            eval_examples=0)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_checkpoints_are_periodic_by_default():
    config = TrainConfig()
    assert config.checkpoint_every > 0 and config.checkpoint_minutes > 0 and config.keep_checkpoints >= 1


def test_periodic_checkpoints_rotate_keeping_the_newest(tmp_path):
    steps, keep = 5, 2
    train(TrainConfig(steps=steps, checkpoint_every=1, keep_checkpoints=keep, out_dir=str(tmp_path), **FAST))
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pt"))
    assert names == [f"checkpoint_{s:07d}.pt" for s in range(steps - keep + 1, steps + 1)]
    assert [load_checkpoint(tmp_path / n)["step"] for n in names] == list(range(steps - keep + 1, steps + 1))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == steps
    assert not list(tmp_path.glob("*.tmp"))


def test_time_based_checkpoints(tmp_path):
    train(TrainConfig(steps=3, checkpoint_every=0, checkpoint_minutes=1e-9, out_dir=str(tmp_path), **FAST))
    assert len(list(tmp_path.glob("checkpoint_*.pt"))) == 3
    train(TrainConfig(steps=3, checkpoint_every=0, checkpoint_minutes=0, out_dir=str(tmp_path / "off"), **FAST))
    assert not list((tmp_path / "off").glob("checkpoint_*.pt"))


def test_another_run_is_refused_resume_and_overwrite_are_not(tmp_path, capsys):
    out = tmp_path / "run"
    first = train(TrainConfig(steps=2, checkpoint_every=1, out_dir=str(out), **FAST))
    before = first.checkpoint.read_bytes()
    with pytest.raises(ValueError, match="already holds another run .* --overwrite"):
        train(TrainConfig(steps=2, out_dir=str(out), **FAST))
    elsewhere = train(TrainConfig(steps=1, out_dir=str(tmp_path / "other"), **FAST)).checkpoint
    with pytest.raises(ValueError, match="already holds another run"):
        train(TrainConfig(steps=2, out_dir=str(out), **FAST), resume=elsewhere)
    argv = ["train", "--size", "tiny", "--steps", "2", "--batch-size", "16", "--out", str(out),
            "--eval-examples", "0", "--no-progress"]
    assert _cli(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    resumed = train(TrainConfig(steps=4, out_dir=str(out), **FAST), resume=out / "checkpoint.pt")
    assert resumed.first_step == 2 and load_checkpoint(out / "checkpoint.pt")["step"] == 4
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    assert load_checkpoint(out / "checkpoint.pt")["run_id"] == run_id  # the same run carried on
    assert _cli(argv + ["--overwrite"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert json.loads((out / "config.json").read_text())["run_id"] != run_id
    assert not list(out.glob("checkpoint_*.pt"))  # the replaced run's files are gone


def test_stale_temp_files_are_removed_and_failed_writes_leave_none(tmp_path):
    first = train(TrainConfig(steps=1, out_dir=str(tmp_path), **FAST))
    (tmp_path / "checkpoint.pt.tmp").write_bytes(os.urandom(100))  # a writer killed mid-write
    train(TrainConfig(steps=2, out_dir=str(tmp_path), **FAST), resume=first.checkpoint)
    assert not list(tmp_path.glob("*.tmp"))
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))


def test_writes_are_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert len(synced) == 2
    if os.path.exists("/proc/self/fd"):
        assert synced[0].endswith("a.bin.tmp") and synced[1] == os.path.realpath(tmp_path)


def _signalled_run(out, signals: list[int]) -> tuple[int, str]:
    """(exit status, stderr) of `loka train` sent ``signals`` 0.05 s apart once it logged a step."""
    cmd = [sys.executable, "-m", "loka.app.cli", "train", "--size", "tiny", "--steps", "10000000",
           "--batch-size", "16", "--out", str(out), "--eval-examples", "0", "--no-progress",
           "--log-every", "1", "--checkpoint-every", "0", "--checkpoint-minutes", "0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, metrics = time.monotonic() + 900, out / "metrics.jsonl"  # hang guard only
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        for i, sig in enumerate(signals):
            time.sleep(0.05 if i else 0.0)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=900)  # hang guard only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_with_a_checkpoint(tmp_path, sig):
    out = tmp_path / "run"
    code, err = _signalled_run(out, [sig])
    assert code == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err
    state = load_checkpoint(out / "checkpoint.pt")
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] == logged[-1] >= 1
    resumed = train(TrainConfig(steps=state["step"] + 1, out_dir=str(out), **FAST), resume=out / "checkpoint.pt")
    assert resumed.first_step == state["step"] and torch.isfinite(torch.tensor(resumed.losses)).all()


@pytest.mark.slow
def test_a_second_sigterm_soon_after_the_first_still_gets_the_checkpoint(tmp_path):
    """Schedulers often signal twice: the second waits for checkpoint.pt (a third would force)."""
    out = tmp_path / "run"
    code, err = _signalled_run(out, [signal.SIGTERM, signal.SIGTERM])
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 1 and "stopped by SIGTERM" in err, err
    if "SIGTERM again" in err:  # the second came while stopping: ignored, the run ends as after one
        assert code == 128 + signal.SIGTERM, err
    else:  # a loaded machine stretched the 0.05 s: the second came after checkpoint.pt was written,
        assert code in (128 + signal.SIGTERM, -signal.SIGTERM), err  # when ending the process is right


def _resume_hint(message: str):
    found = re.search(r"--resume (\S+\.pt)", message)
    return Path(found.group(1)) if found else None


def test_a_refused_out_is_left_untouched_and_its_hint_names_a_real_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(steps=2, checkpoint_every=1, out_dir=str(out), **FAST))
    (out / "checkpoint.pt").unlink()  # killed after its periodic checkpoints: no checkpoint.pt
    (out / "checkpoint.pt.tmp").write_bytes(os.urandom(64))
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(ValueError, match="already holds another run") as info:
        train(TrainConfig(steps=1, out_dir=str(out), **FAST))
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before  # nothing touched
    hint = _resume_hint(str(info.value))
    assert hint is not None and hint.exists() and load_checkpoint(hint)["step"] == 2
    for periodic in out.glob("checkpoint_*.pt"):
        periodic.unlink()
    with pytest.raises(ValueError, match="already holds another run") as info:  # metrics, no checkpoint
        train(TrainConfig(steps=1, out_dir=str(out), **FAST))
    assert _resume_hint(str(info.value)) is None and "no checkpoint" in str(info.value)


def test_a_first_run_that_failed_on_bad_data_does_not_block_its_out(tmp_path):
    out = tmp_path / "run"
    batch = SyntheticStream(RankerConfig.from_size("tiny"), FAST["batch_size"], seed=0).batch(0)
    batch.labels[0, 0] = 2.0
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        train(TrainConfig(steps=2, out_dir=str(out), **FAST), data=iter([batch]))
    assert (out / "config.json").exists()
    result = train(TrainConfig(steps=1, out_dir=str(out), **FAST))  # the fixed data, the same --out
    assert load_checkpoint(result.checkpoint)["step"] == 1
