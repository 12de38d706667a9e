"""A training run's output directory: when checkpoints are written, how many are kept, and
whose directory it is.

Why: a long run must not lose its work. Checkpoints are written every ``checkpoint_every``
steps and every ``checkpoint_minutes`` minutes by default, and once more when SIGTERM or
SIGINT asks the run to stop (the current step finishes first; a second signal waits for that
checkpoint, a third stops at once). Periodic files
``checkpoint_<step>.pt`` are rotated (the last ``keep_checkpoints`` stay); ``checkpoint.pt``
is the run's latest end point. A directory that holds another run is never written over
without ``overwrite`` (and nothing in it is touched then), and temp files a killed writer
left behind are removed.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from .checkpoint import save_checkpoint
from .guards import check_before_save
from .resume import plan_record, rng_record

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "eval.json", "eval_outputs.npz")
PERIODIC_GLOB = "checkpoint_[0-9]*.pt"


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def dir_run_id(out_dir: Path) -> str | None:
    """The run id recorded in ``out_dir/config.json`` (None: none recorded)."""
    try:
        return json.loads((out_dir / "config.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def claim_out_dir(out_dir: Path, run_id: str, resume: Path | None, overwrite: bool) -> None:
    """Make ``out_dir`` this run's, or refuse (ValueError) before touching anything in it if it
    holds a different run, unless ``overwrite`` (then that run's files are removed). Then
    remove stale temp files.

    Same run: resuming a checkpoint that lives in ``out_dir`` or carries its run id. A run
    that failed before logging its first step (only config.json and an empty metrics.jsonl)
    left no work to lose: its files are replaced.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (out_dir / f for f in RUN_FILES) if p.exists()]
    existing += sorted(out_dir.glob(PERIODIC_GLOB))
    same = resume is not None and (resume.resolve().parent == out_dir.resolve()
                                   or dir_run_id(out_dir) in (run_id,))
    if existing and not same and not overwrite and not _no_work(existing):
        raise ValueError(f"{out_dir} already holds another run ({_names(existing)}); {_continue_hint(out_dir)}"
                         "replace it with --overwrite (overwrite=True), or choose another --out.")
    for tmp in out_dir.glob("*.tmp"):  # a writer killed mid-write; the file it replaced is intact
        tmp.unlink(missing_ok=True)
    for path in existing if not same else []:
        path.unlink(missing_ok=True)


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:4]) + (", ..." if len(paths) > 4 else "")


def _no_work(existing: list[Path]) -> bool:
    """Only config.json and an empty metrics.jsonl: a run that stopped before its first logged step."""
    names = {p.name for p in existing}
    return names <= {"config.json", "metrics.jsonl"} and all(
        p.name != "metrics.jsonl" or p.stat().st_size == 0 for p in existing)


def _continue_hint(out_dir: Path) -> str:
    """'continue it with --resume X, ' naming a checkpoint that exists (or saying there is none)."""
    newest = out_dir / "checkpoint.pt"
    if not newest.exists():
        periodic = sorted(out_dir.glob(PERIODIC_GLOB))
        newest = periodic[-1] if periodic else None
    if newest is None:
        return "it has no checkpoint to continue from; "
    return f"continue it with --resume {newest}, "


class CheckpointSchedule:
    """When the next periodic checkpoint is due: every ``every_steps`` steps or ``minutes``
    minutes since the last one (0 turns either off)."""

    def __init__(self, every_steps: int, minutes: float) -> None:
        self.every_steps, self.seconds = every_steps, minutes * 60.0
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps and step % self.every_steps == 0
        by_time = self.seconds and time.monotonic() - self.last >= self.seconds
        return bool(by_steps or by_time)

    def saved(self) -> None:
        self.last = time.monotonic()


def rotate(out_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``checkpoint_<step>.pt`` files."""
    periodic = sorted(out_dir.glob(PERIODIC_GLOB))
    for path in periodic[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)


class ForcedStop(KeyboardInterrupt):
    """A third stop signal: the run ended at once; ``signum`` is that signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM and SIGINT ask the run to stop after the current step and write
    its checkpoint instead of killing it. A second signal is ignored (with a line saying so)
    until that checkpoint is written, since schedulers often signal twice in quick succession;
    a third stops at once, without the checkpoint (`ForcedStop`, a KeyboardInterrupt).

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    run keeps the default behaviour. ``signum`` is the first signal received, or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1:
            self.signum = signum
        elif self.received == 2:
            print(f"{name} again: still stopping after this step and writing checkpoint.pt; "
                  "a third signal stops at once without it", file=sys.stderr, flush=True)
        else:
            raise ForcedStop(signum, f"{name} a third time: stopped at once, without writing checkpoint.pt")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None


class RunSaver:
    """Writes this run's checkpoints (rank 0, with an out_dir): guarded against NaN/Inf (in the
    state, and in the forward of the step that made it, ``rerun``), with
    everything an exact resume needs (RNG, run id, the plan's text), periodic ones rotated."""

    def __init__(self, config, model, optimizers, data, run_id: str, is_main: bool, last=None) -> None:
        self.config, self.model, self.optimizers, self.data = config, model, optimizers, data
        self.out_dir = Path(config.out_dir) if config.out_dir and is_main else None
        self.extra = {"run_id": run_id, **plan_record(config.precision)}
        self.schedule = CheckpointSchedule(config.checkpoint_every, config.checkpoint_minutes)
        self.last: Path | None = Path(last) if last else None  # the newest good checkpoint
        self.rerun = None  # repeats the forward of the newest applied update's step (checked before a save)

    def save(self, name: str, step: int) -> Path | None:
        if self.out_dir is None:
            return None
        check_before_save(self.model, self.optimizers, step, self.last, self.rerun)
        stream = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        self.last = save_checkpoint(self.out_dir / name, self.model, self.optimizers, stream, step,
                                    dataclasses.asdict(self.config), self.config.precision,
                                    extra={**self.extra, **rng_record()})
        self.schedule.saved()
        return self.last

    def periodic(self, step: int) -> None:
        if self.out_dir is not None and self.schedule.due(step):
            self.save(f"checkpoint_{step:07d}.pt", step)
            rotate(self.out_dir, self.config.keep_checkpoints)
