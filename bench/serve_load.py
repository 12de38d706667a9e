"""Bounded load test of the scoring service over loopback: requests/s, p50/p99, resets, server RSS.

Starts `loka.models.serve` in a child process (a fresh ranker of ``--size``, so no checkpoint
is needed), then for each number of candidates per request and each number of concurrent
clients runs a closed loop for ``--seconds``: every client holds one keep-alive connection
and sends the same pre-serialized request again as soon as its answer is in (each client sends
at least one). Counted per cell: answers by status, connection errors (resets, refused,
timeouts), latency p50/p99, requests/s; the server's RSS is sampled from /proc every 50 ms.
The run stops by itself: the window is bounded, every request has a timeout, and the server
is stopped (SIGTERM, then SIGKILL) at the end. Exit status 1 if any connection error or
non-200 answer was seen, or the server's peak RSS exceeded ``--max-rss-mb``.

    python bench/serve_load.py --size tiny --out bench/results/serve_load_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter


def _serve(args) -> int:
    """Child mode: serve a fresh ranker until SIGTERM."""
    import torch

    from loka.models import Ranker, RankerConfig
    from loka.models.engine import InferenceEngine
    from loka.models.serve import ScoringServer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = InferenceEngine(Ranker(RankerConfig.from_size(args.size)), device="cpu")
    engine.warmup()
    server = ScoringServer(engine, port=0, max_inflight=args.max_inflight, request_timeout_s=args.request_timeout)
    print(f"serving {server.url}", flush=True)
    server.serve_forever()
    return 0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb(self.pid))


def _request_body(size: str, n: int) -> bytes:
    from loka.models import RankerConfig, SyntheticStream
    from loka.models.serving_schema import batch_to_request

    return json.dumps(batch_to_request(SyntheticStream(RankerConfig.from_size(size), n, seed=n).batch(0))).encode()


def _client(host, port, body, deadline, latencies, outcomes, lock, expected) -> None:
    conn = None
    first = True
    while first or time.perf_counter() < deadline:
        first = False
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=120)
            start = time.perf_counter()
            conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            elapsed, outcome = time.perf_counter() - start, resp.status
        except (OSError, http.client.HTTPException) as err:
            elapsed, outcome = None, type(err).__name__
            if conn is not None:
                conn.close()
            conn = None
        with lock:
            outcomes[outcome] += 1
            if outcome == expected:
                latencies.append(elapsed)
    if conn is not None:
        conn.close()


def run_cell(host: str, port: int, body: bytes, clients: int, seconds: float, sampler: _RssSampler,
             expected: int = 200) -> dict:
    latencies: list[float] = []
    outcomes: Counter = Counter()
    lock = threading.Lock()
    sampler.peak = 0.0
    start = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(host, port, body, start + seconds, latencies, outcomes, lock, expected))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    p = lambda q: 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"clients": clients, "requests": sum(outcomes.values()), "ok": outcomes.get(expected, 0),
            "errors": {str(k): v for k, v in outcomes.items() if k != expected}, "wall_s": wall,
            "req_per_s": outcomes.get(expected, 0) / wall, "p50_ms": p(0.5), "p99_ms": p(0.99),
            "mean_ms": 1e3 * statistics.fmean(latencies) if latencies else float("nan"), "peak_rss_mb": sampler.peak}


def _start_server(args) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--size", args.size, "--threads", str(args.threads),
           "--max-inflight", str(args.max_inflight), "--request-timeout", str(args.request_timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving http://"):
        proc.kill()
        raise SystemExit(f"serve_load: the server did not start (said {line!r})")
    host, port = line.split("//")[1].strip().rsplit(":", 1)
    return proc, host, int(port)


def _table(rows: list[dict]) -> str:
    out = ["| candidates | clients | requests | answered as expected | errors | req/s | p50 ms | p99 ms | peak RSS MB |",
           "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        out.append(f"| {r['candidates']} | {r['clients']} | {r['requests']} | {r['ok']} | {errors} | "
                   f"{r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", help="ranker size (tiny | small; fresh weights)")
    p.add_argument("--candidates", default="4,4096")
    p.add_argument("--clients", default="1,8,32,128")
    p.add_argument("--seconds", type=float, default=4.0, help="closed-loop window per cell")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the server")
    p.add_argument("--max-inflight", type=int, default=4, help="the server's --max-inflight")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="the server's wait for a slot and a result before 503 (its default is 30 s; "
                        "128 clients of 4096 candidates queue longer than that on 2 CPUs)")
    p.add_argument("--abuse-clients", type=int, default=96,
                   help="then this many clients at once send one --abuse-mb body each (answered 400)")
    p.add_argument("--abuse-mb", type=float, default=7.0)
    p.add_argument("--max-rss-mb", type=float, default=2000.0, help="fail if the server's RSS exceeds this")
    p.add_argument("--out", default=None, help="write the results (markdown) here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return _serve(args)
    load_before = os.getloadavg()
    proc, host, port = _start_server(args)
    sampler = _RssSampler(proc.pid)
    sampler.start()
    rows, rss_start = [], _rss_mb(proc.pid)
    try:
        for n in (int(x) for x in args.candidates.split(",")):
            body = _request_body(args.size, n)
            for clients in (int(x) for x in args.clients.split(",")):
                row = {"candidates": n, "body_kb": len(body) / 1024, **run_cell(host, port, body, clients,
                                                                                 args.seconds, sampler)}
                rows.append(row)
                print(_table([row]).splitlines()[-1], flush=True)
        if args.abuse_clients:
            pad = b" " * int(args.abuse_mb * (1 << 20))
            junk = b'{"candidates": [' + pad + b"]}"  # valid JSON, refused (no candidates) once read
            row = {"candidates": f"{args.abuse_mb:g} MB junk", **run_cell(host, port, junk, args.abuse_clients, 0.0,
                                                                          sampler, expected=400)}
            rows.append(row)
            print(_table([row]).splitlines()[-1], flush=True)
        rss_end = _rss_mb(proc.pid)
    finally:
        sampler.stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
    peak = max(r["peak_rss_mb"] for r in rows)
    failed = sum(sum(r["errors"].values()) for r in rows)
    report = "\n".join([
        f"command: `python bench/serve_load.py {' '.join(sys.argv[1:])}`",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; "
        f"python {platform.python_version()}; server: `{args.size}` ranker, fresh weights, "
        f"{args.threads} torch thread(s), --max-inflight {args.max_inflight}, clients in another process",
        "", _table(rows), "",
        f"server RSS: {rss_start:.0f} MB after warm-up, peak {peak:.0f} MB, {rss_end:.0f} MB at the end; "
        f"connection errors and non-200 answers: {failed}",
    ])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 1 if failed or peak > args.max_rss_mb else 0


if __name__ == "__main__":
    raise SystemExit(main())
