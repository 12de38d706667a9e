"""Scoring service: `loka serve --checkpoint ...` - an HTTP server on loopback over an engine.

POST /score with the JSON of `serving_schema` -> ``{"scores": {"ctr": [...], "cvr": [...]}}``;
GET /health -> ``{"status": "ok", ...}``. Requests from concurrent clients are batched: a
worker thread takes queued requests until ``max_batch`` examples or ``max_wait_ms`` have
passed, runs ONE forward over their concatenated candidates and hands each request its
slice. Malformed requests get a 4xx with a message; an exception in the model answers 500
for the requests of that batch only; the server keeps running either way.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .batch import Batch
from .engine import InferenceEngine
from .serving_schema import RequestError, parse_request

MAX_BODY_BYTES = 8 << 20


@dataclass
class _Pending:
    batch: Batch
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None


class Batcher:
    """Collects requests across clients into batches of at most ``max_batch`` examples."""

    def __init__(self, engine: InferenceEngine, max_batch: int = 1024, max_wait_ms: float = 2.0) -> None:
        if max_batch <= 0 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0.")
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000.0
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.batches_run = 0
        self.worker = threading.Thread(target=self._run, name="loka-batcher", daemon=True)
        self.worker.start()

    def submit(self, batch: Batch, timeout: float = 30.0) -> dict:
        """Scores for ``batch`` ({task: list of floats}); raises TimeoutError or RuntimeError."""
        pending = _Pending(batch)
        self.queue.put(pending)
        if not pending.done.wait(timeout):
            raise TimeoutError(f"no result within {timeout:.0f}s")
        if pending.error is not None:
            raise RuntimeError(pending.error)
        return pending.result

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
            group = self._collect(first)
            try:
                scores = self.engine.score(Batch.cat([p.batch for p in group]))
                start = 0
                for p in group:
                    stop = start + p.batch.size
                    p.result = {t: v[start:stop].tolist() for t, v in scores.items()}
                    start = stop
            except Exception as exc:  # the service must survive a bad batch
                for p in group:
                    p.error = f"{type(exc).__name__}: {exc}"
            self.batches_run += 1
            for p in group:
                p.done.set()


def _make_handler(engine: InferenceEngine, batcher: Batcher):
    class Handler(BaseHTTPRequestHandler):
        server_version = "loka-serve/1"

        def log_message(self, fmt, *args):  # quiet by default; errors are in the responses
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/health":
                return self._reply(404, {"error": f"no such path {self.path}; use POST /score or GET /health"})
            self._reply(200, {"status": "ok", "size": engine.config.size, "tasks": list(engine.config.tasks),
                              "precision": engine.precision, "batches_run": batcher.batches_run})

        def do_POST(self):
            if self.path != "/score":
                return self._reply(404, {"error": f"no such path {self.path}; use POST /score"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                length = -1
            if length < 0:
                return self._reply(411, {"error": "a non-negative Content-Length header is required"})
            if length > MAX_BODY_BYTES:
                return self._reply(413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"})
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                batch = parse_request(engine.config, body)
            except json.JSONDecodeError as exc:
                return self._reply(400, {"error": f"body is not valid JSON: {exc}"})
            except RequestError as exc:
                return self._reply(400, {"error": str(exc)})
            try:
                scores = batcher.submit(batch)
            except TimeoutError as exc:
                return self._reply(503, {"error": str(exc)})
            except RuntimeError as exc:
                return self._reply(500, {"error": f"scoring failed: {exc}"})
            self._reply(200, {"scores": scores, "n": batch.size})

    return Handler


class ScoringServer:
    """The service; ``start()`` serves in a background thread, ``serve_forever()`` in this one."""

    def __init__(self, engine: InferenceEngine, host: str = "127.0.0.1", port: int = 8080,
                 max_batch: int = 1024, max_wait_ms: float = 2.0) -> None:
        self.engine = engine
        self.batcher = Batcher(engine, max_batch, max_wait_ms)
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(engine, self.batcher))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ScoringServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
