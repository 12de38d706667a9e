"""Keeping the probe's cost bounded: a clock of probe time vs training time.

The probe spends time in two places: in its hooks on sampled steps (copying operands)
and in the analysis of what they captured. :class:`OverheadClock` measures the time the
*training thread* spends on the probe (hooks, plus the analysis when it runs in the
foreground, or any wait for a background analysis), and separately the time the
background analysis took on its own thread (``background_s``); the wall time between
``Probe.step`` calls minus the training thread's probe time is training time. With
``ProbeConfig(overhead_budget=0.05)`` a step that the schedule makes due is postponed
(to the first later step that fits) while ``probe time + expected cost of one more
sample > budget x training time``; so over a run the probe's share stays near the budget
whatever the model. The first sample is always taken (nothing is known yet).
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class OverheadClock:
    """Wall-clock accounting of probe work vs training work."""

    def __init__(self) -> None:
        self.probe_s = 0.0
        self.background_s = 0.0
        self.samples = 0
        self._start: float | None = None
        self._probe_at_start = 0.0

    def mark(self) -> None:
        """Called at every ``Probe.step``: starts the training clock on the first call."""
        if self._start is None:
            self._start = time.perf_counter()
            self._probe_at_start = self.probe_s

    @property
    def train_s(self) -> float:
        if self._start is None:
            return 0.0
        return max(time.perf_counter() - self._start - (self.probe_s - self._probe_at_start), 0.0)

    @contextmanager
    def probe_work(self, hook_seconds: float = 0.0):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.probe_s += time.perf_counter() - t0 + hook_seconds
            self.samples += 1

    @contextmanager
    def waiting(self):
        """Time the training thread waits for a background analysis (counted as probe time)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.probe_s += time.perf_counter() - t0

    def add_background(self, seconds: float) -> None:
        self.background_s += seconds

    def affordable(self, budget: float | None) -> bool:
        if budget is None or self.samples == 0:
            return True
        per_sample = self.probe_s / self.samples
        return self.probe_s + per_sample <= budget * self.train_s

    def summary(self) -> dict:
        train = self.train_s
        return {"probe_s": self.probe_s, "background_s": self.background_s, "train_s": train,
                "samples": self.samples, "fraction": self.probe_s / train if train > 0 else 0.0}
