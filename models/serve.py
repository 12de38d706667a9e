"""Scoring service: `loka serve --checkpoint ...` - an ASGI app served by uvicorn on loopback.

POST /score with the JSON of `serving_schema` -> ``{"scores": {"ctr": [...], "cvr": [...]}, "n": N}``;
GET (or HEAD) /health -> ``{"status": "ok", ...}``; GET /metrics -> Prometheus text. Requests from
concurrent clients share forwards through the `Batcher`.

Why not a hand-rolled server: the previous `http.server` one had a listen backlog of 5 (bursts
lost connections to resets), a thread per client and no socket timeout (slow clients held
threads), and no bound on memory. Here uvicorn's HTTP/1.1 (keep-alive, backlog 2048, one event
loop) carries an app that bounds everything a client controls (`ServeConfig`):

- a request head must arrive within ``read_timeout_s`` (uvicorn itself only times out idle
  keep-alive connections) and so must the body, else the connection is closed / 408; a head
  over 16 KiB (`MAX_HEAD_BYTES`) gets 400, whether it arrives in pieces (h11) or at once;
- the body is read before the request takes an in-flight slot, so a slow client holds none;
- a body over ``max_body_bytes`` gets 413 (one up to twice the limit is read and dropped first,
  so that the answer is not lost to a TCP reset; a larger declared one is refused unread);
- at most ``max_inflight`` requests are parsed and scored at once (others wait for a slot, at
  most ``request_timeout_s``, then 503); bodies still arriving take at most
  ``max_body_bytes`` each, on at most ``max_connections`` connections; past
  ``max_connections`` open connections a request gets 503 at once;
- every answer is JSON (``allow_nan=False``): bad input 4xx naming the field, a malformed HTTP
  head 400, non-finite model scores 500 (`NonFiniteScores`), an internal error 500 with its type.

`stop()` (or SIGTERM/SIGINT under `serve_forever`) is graceful: the listener closes, requests
in flight finish (up to ``graceful_timeout_s``), then the batcher stops.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .batcher import Batcher, NonFiniteScores
from .engine import InferenceEngine
from .serve_metrics import ServeMetrics
from .serving_schema import RequestError, parse_request

log = logging.getLogger("loka.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Where the service listens and every bound it enforces (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 1024
    max_wait_ms: float = 2.0
    max_body_bytes: int = 8 << 20  # a 4096-candidate request of the `small` ranker is about 1.2 MB
    max_inflight: int = 4
    max_connections: int = 1024
    read_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    keep_alive_s: int = 5
    graceful_timeout_s: int = 30
    backlog: int = 2048

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise TypeError(f"ServeConfig.host must be an address like '127.0.0.1', got {self.host!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "host" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"ServeConfig.{f.name} must be a number, got {value!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServeConfig.port={self.port} must be in [0, 65536) (0: any free port)")
        positive = ("max_batch", "max_body_bytes", "max_inflight", "max_connections", "read_timeout_s",
                    "request_timeout_s", "keep_alive_s", "graceful_timeout_s", "backlog")
        bad = [n for n in positive if getattr(self, n) <= 0] + (["max_wait_ms"] if self.max_wait_ms < 0 else [])
        if bad:
            raise ValueError(f"ServeConfig: {', '.join(bad)} must be > 0 (max_wait_ms >= 0); "
                             f"got {', '.join(f'{n}={getattr(self, n)}' for n in bad)}")


MAX_HEAD_BYTES = 16 * 1024  # request line + headers; h11's own bound on a head still arriving


def _head_bytes(scope) -> int:
    """The size of the request head as sent: request line, ``name: value`` lines, blank line."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string") or b"")
    line = len(scope["method"]) + 1 + target + (1 if scope.get("query_string") else 0) + 11  # " HTTP/1.1\r\n"
    return line + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + 2


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    pass


class _BodyDrained(Exception):
    """Marks a 413 whose body was read to the end: the connection can carry another request."""


async def _send(send, status: int, body: bytes, content_type: bytes, close: bool = False) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if close:  # the request body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ScoringApp:
    """The ASGI application: routes, limits, JSON answers. Runs on uvicorn's event loop."""

    def __init__(self, engine: InferenceEngine, batcher: Batcher, config: ServeConfig, connections) -> None:
        self.engine, self.batcher, self.config = engine, batcher, config
        self.metrics = ServeMetrics()
        self._connections = connections  # () -> open connections (uvicorn's count)
        self._parse_pool = ThreadPoolExecutor(config.max_inflight, thread_name_prefix="loka-parse")
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        start, path = time.perf_counter(), scope["path"]
        close = False
        try:
            if path == "/metrics" and scope["method"] == "GET" and _head_bytes(scope) <= MAX_HEAD_BYTES:
                text = self.metrics.render(self.batcher.batches_run, self.batcher.examples_scored, self._connections())
                await _send(send, 200, text.encode(), b"text/plain; version=0.0.4")
                self.metrics.observe(path, 200, time.perf_counter() - start)
                return
            status, payload = 200, await self._route(scope, receive)
        except _HTTPError as err:  # unless the body was read, the connection cannot carry another request
            status, payload = err.status, {"error": str(err)}
            close = err.status in (400, 408, 413, 503) and not isinstance(err.__cause__, _BodyDrained)
        except _ClientGone:
            return
        except Exception as exc:  # the service answers JSON even for its own bugs
            log.exception("internal error on %s", path)
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except ValueError as exc:
            status, body = 500, json.dumps({"error": f"the answer was not valid JSON: {exc}"}).encode()
        await _send(send, status, body, b"application/json", close)
        self.metrics.observe(path, status, time.perf_counter() - start)

    async def _route(self, scope, receive) -> dict:
        path, method = scope["path"], scope["method"]
        head = _head_bytes(scope)
        if head > MAX_HEAD_BYTES:  # h11 bounds only a head that arrives in pieces; this, one in one piece
            raise _HTTPError(400, f"the request head is {head} bytes, over the limit of {MAX_HEAD_BYTES} "
                                  "(request line and headers)")
        routes = {"/score": ("POST",), "/health": ("GET", "HEAD"), "/metrics": ("GET",)}
        if path not in routes:
            raise _HTTPError(404, f"no such path {path}; use POST /score, GET /health or GET /metrics")
        if method not in routes[path]:
            raise _HTTPError(405, f"{path} takes {' or '.join(routes[path])}, not {method}")
        if path == "/health":
            cfg = self.engine.config
            return {"status": "ok", "size": cfg.size, "tasks": list(cfg.tasks), "precision": str(self.engine.precision),
                    "batches_run": self.batcher.batches_run}
        if self._connections() > self.config.max_connections:
            raise _HTTPError(503, f"more than {self.config.max_connections} open connections; retry later")
        return await self._score(scope, receive)

    async def _score(self, scope, receive) -> dict:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is None and b"transfer-encoding" not in headers:
            raise _HTTPError(411, "a Content-Length header (or a chunked body) is required")
        if declared is not None and int(declared) > self.config.max_body_bytes:  # h11 checked it is a number
            await self._refuse_body(receive, 0, declared=int(declared))
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_inflight)
        body = await self._read_body(receive)  # before a slot: a slow client holds none
        try:
            await asyncio.wait_for(self._slots.acquire(), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise _HTTPError(503, f"the server is busy (all {self.config.max_inflight} slots taken for "
                                  f"{self.config.request_timeout_s:.0f}s); retry later") from None
        self.metrics.enter()
        try:
            loop = asyncio.get_running_loop()
            try:
                batch = await loop.run_in_executor(self._parse_pool, parse_request, self.engine.config, body)
            except RequestError as err:
                raise _HTTPError(400, str(err)) from None
            future = asyncio.wrap_future(self.batcher.submit(batch))
            try:
                scores = await asyncio.wait_for(future, self.config.request_timeout_s)
            except asyncio.TimeoutError:
                raise _HTTPError(503, f"no result within {self.config.request_timeout_s:.0f}s") from None
            except NonFiniteScores as err:
                raise _HTTPError(500, str(err)) from None
            except RuntimeError as err:
                raise _HTTPError(500, f"scoring failed: {err}") from None
            return {"scores": scores, "n": batch.size}
        finally:
            self.metrics.leave()
            self._slots.release()

    async def _receive(self, receive, deadline: float) -> dict:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise _HTTPError(408, f"the body did not arrive within {self.config.read_timeout_s:g}s") from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        return message

    async def _read_body(self, receive) -> bytes:
        """The whole body, within ``read_timeout_s`` and ``max_body_bytes`` (chunked bodies too)."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.config.read_timeout_s
        while True:
            message = await self._receive(receive, deadline)
            more = message.get("more_body", False)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.config.max_body_bytes:
                chunks.clear()
                await self._refuse_body(receive, size, more, deadline=deadline)
            if not more:
                return b"".join(chunks)

    async def _refuse_body(self, receive, read: int, more: bool = True, declared: int | None = None,
                           deadline: float | None = None):
        """Raise 413, after reading and dropping the rest of a body up to twice the limit.

        Closing a socket with unread data makes the kernel send a reset, which destroys the
        413 on its way to a client that is still sending: so a body up to twice the limit is
        drained (nothing is kept) and the connection stays usable; a larger one gets the 413
        at once and the connection is closed.
        """
        limit = self.config.max_body_bytes
        size = f"{declared} bytes" if declared is not None else f"{read}+ bytes" if more else f"{read} bytes"
        error = _HTTPError(413, f"a body of {size} exceeds the limit of {limit} bytes (--max-body-bytes)")
        if declared is not None and declared > 2 * limit:
            raise error
        deadline = time.monotonic() + self.config.read_timeout_s if deadline is None else deadline
        try:
            while more and read <= 2 * limit:
                message = await self._receive(receive, deadline)
                read += len(message.get("body", b""))
                more = message.get("more_body", False)
        except _HTTPError:  # the rest did not come in time: answer 413 and close
            raise error from None
        if more:
            raise error
        raise error from _BodyDrained()

    def close(self) -> None:
        self._parse_pool.shutdown(wait=False, cancel_futures=True)


class _HeadDeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request head, and TCP_NODELAY.

    uvicorn closes idle keep-alive connections, but waits forever for a client that sends its
    request line and headers slowly or never; here an incomplete head is dropped after
    ``head_timeout`` seconds, counted from the connection or the end of the previous response.
    """

    def __init__(self, *args, head_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout, self._head_timer = head_timeout, None

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # uvicorn writes a response's head and body separately: with Nagle's algorithm the
            # body waits for the client's delayed ACK of the head, 40 ms on every answer
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_head_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is in
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        self._arm_head_deadline()  # before super(): a pipelined request it handles cancels it again
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as JSON like every other answer."""
        body = json.dumps({"error": f"{msg.rstrip('.')}: a malformed request line, header or "
                                    f"Content-Length (HTTP/1.1 expected)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err}; choose another --port (0 picks a free one)") from err
    sock.listen(backlog)
    return sock


class ScoringServer:
    """The service; ``start()`` serves in a background thread, ``serve_forever()`` in this one.

    ``ScoringServer(engine, port=0)`` binds at once (so ``url`` has the real port); keyword
    arguments are `ServeConfig` fields, or pass ``config=ServeConfig(...)``.
    """

    def __init__(self, engine: InferenceEngine, config: ServeConfig | None = None, **overrides) -> None:
        self.config = config = ServeConfig(**{**(vars(config) if config else {}), **overrides})
        self.engine = engine
        self.batcher = Batcher(engine, config.max_batch, config.max_wait_ms)
        self._socket = _listen(config.host, config.port, config.backlog)
        self.app = ScoringApp(engine, self.batcher, config, lambda: len(self._server.server_state.connections))
        protocol = functools.partial(_HeadDeadlineH11, head_timeout=config.read_timeout_s)
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, http=protocol, ws="none", lifespan="off", log_level="warning", access_log=False,
            backlog=config.backlog, timeout_keep_alive=config.keep_alive_s,
            timeout_graceful_shutdown=config.graceful_timeout_s))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    def start(self) -> "ScoringServer":
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="loka-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self._server.started:
            raise RuntimeError("the scoring server did not start within 30 s; see the log above")
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (graceful), then stop the batcher."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._close()

    def ask_stop(self) -> None:
        """Ask a running (or about to run) server to stop gracefully; returns at once (signal-safe)."""
        self._server.should_exit = True

    def stop(self) -> None:
        """Graceful: stop accepting, let requests in flight finish, then stop the batcher."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.config.graceful_timeout_s + 5)
        self._close()

    def _close(self) -> None:
        self._socket.close()
        self.app.close()
        self.batcher.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
