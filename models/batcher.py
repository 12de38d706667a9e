"""Cross-request batching for the scoring service: many small requests, one forward.

A worker thread takes queued requests until ``max_batch`` examples or ``max_wait_ms`` have
passed, runs ONE forward over their concatenated candidates and resolves each request's
future with its slice. An exception in the model fails the requests of that batch only.
Scores that are not finite (a corrupt checkpoint, an overflow) fail their request with
`NonFiniteScores` instead of reaching a client as ``NaN``, which is not JSON.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .batch import Batch
from .engine import InferenceEngine


class NonFiniteScores(RuntimeError):
    """The model produced NaN/Inf scores for a request; the service answers 500 with this message."""


@dataclass
class _Pending:
    batch: Batch
    future: Future


def _request_scores(scores: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, list[float]]:
    out = {}
    for task, values in scores.items():
        part = values[start:stop]
        bad = (~torch.isfinite(part)).nonzero().flatten()
        if bad.numel():
            raise NonFiniteScores(
                f"the model produced {bad.numel()} non-finite {task} scores (first at candidate "
                f"{int(bad[0])}: {float(part[bad[0]])}); its weights are likely NaN/Inf: check the "
                f"checkpoint (train with the NaN guard) before serving it")
        out[task] = part.tolist()
    return out


class Batcher:
    """Collects requests across clients into batches of at most ``max_batch`` examples."""

    def __init__(self, engine: InferenceEngine, max_batch: int = 1024, max_wait_ms: float = 2.0) -> None:
        if max_batch <= 0 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0.")
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000.0
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.batches_run = 0
        self.examples_scored = 0
        self.worker = threading.Thread(target=self._run, name="loka-batcher", daemon=True)
        self.worker.start()

    def submit(self, batch: Batch) -> Future:
        """A future of {task: list of floats} for ``batch``; it raises what scoring raised."""
        future: Future = Future()
        self.queue.put(_Pending(batch, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=5)

    def _collect(self, first: _Pending) -> list[_Pending]:
        group, n = [first], first.batch.size
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            try:
                nxt = self.queue.get(timeout=max(deadline - time.perf_counter(), 0.0))
            except queue.Empty:
                break
            if nxt is None:
                self.queue.put(None)
                break
            group.append(nxt)
            n += nxt.batch.size
        return group

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            group = [p for p in self._collect(first) if p.future.set_running_or_notify_cancel()]
            if not group:
                continue
            try:
                scores = self.engine.score(Batch.cat([p.batch for p in group]))
            except Exception as exc:  # the service must survive a bad batch
                for p in group:
                    p.future.set_exception(RuntimeError(f"{type(exc).__name__}: {exc}"))
                continue
            finally:
                self.batches_run += 1
            start = 0
            for p in group:
                stop = start + p.batch.size
                try:
                    p.future.set_result(_request_scores(scores, start, stop))
                except NonFiniteScores as exc:
                    p.future.set_exception(exc)
                start = stop
            self.examples_scored += start
