"""Latency / throughput of the ranker's inference engine (and optionally the HTTP service).

For each batch size (candidates scored per call) runs ``--iters`` timed calls after
``--warmup`` untimed ones and reports p50 / p99 latency and candidates/s. With ``--http``
it also measures end-to-end requests over loopback from ``--clients`` concurrent clients,
through the server's cross-client batcher.

    python bench/serve_bench.py --size small --batch-sizes 1,16,64,256,1024 --threads 2
    python bench/serve_bench.py --size base --device cuda --precision fp8 --compile   # on a GPU

torch.compile: the engine compiles with dynamic shapes, and dynamo's recompile limit is raised
so that many batch sizes in one process do not silently fall back to eager (reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

import torch

from loka.models import Ranker, RankerConfig, SyntheticStream
from loka.models.engine import InferenceEngine


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_engine(engine: InferenceEngine, batch_size: int, iters: int, warmup: int) -> dict:
    batch = SyntheticStream(engine.config, batch_size, seed=7, device=engine.device).batch(0)
    for _ in range(warmup):
        engine.score(batch)
    times = []
    for _ in range(iters):
        _sync(engine.device)
        start = time.perf_counter()
        engine.score(batch)  # returns CPU tensors, so this includes the device->host copy
        times.append(time.perf_counter() - start)
    p50 = statistics.median(times)
    return {"batch": batch_size, "p50_ms": 1e3 * p50, "p99_ms": 1e3 * _percentile(times, 0.99),
            "candidates_per_s": batch_size / p50}


def bench_http(engine: InferenceEngine, batch_size: int, clients: int, requests: int) -> dict:
    from loka.models.serve import ScoringServer
    from loka.models.serving_schema import batch_to_request

    batch = SyntheticStream(engine.config, batch_size, seed=7).batch(0)
    body = json.dumps(batch_to_request(batch)).encode()
    latencies: list[float] = []
    lock = threading.Lock()
    with ScoringServer(engine, port=0) as server:
        def client() -> None:
            for _ in range(requests):
                req = urllib.request.Request(server.url + "/score", data=body)
                start = time.perf_counter()
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                with lock:
                    latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        batches = server.batcher.batches_run
    return {"batch": batch_size, "clients": clients, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * _percentile(latencies, 0.99),
            "candidates_per_s": batch_size * len(latencies) / wall,
            "requests_per_forward": len(latencies) / max(batches, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--checkpoint", default=None, help="default: a freshly initialized model")
    p.add_argument("--precision", default="bf16", help="bf16 | fp32 | fp8 | plan file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch-sizes", default="1,16,64,256,1024")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--http", action="store_true", help="also measure end to end over loopback")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=20, help="requests per client (--http)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    if args.checkpoint:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, plan=args.precision,
                                                 compile=args.compile, device=args.device)
    else:
        engine = InferenceEngine(Ranker(RankerConfig.from_size(args.size)), precision=args.precision,
                                 compile=args.compile, device=args.device)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows = [bench_engine(engine, b, args.iters, args.warmup) for b in sizes]
    if args.http:
        rows += [{"mode": "http", **bench_http(engine, b, args.clients, args.requests)} for b in sizes]
    print(f"engine: size={engine.config.size} precision={args.precision} device={engine.device} "
          f"compile={args.compile} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'mode':<7} {'batch':>6} {'p50 ms':>9} {'p99 ms':>9} {'cand/s':>12}")
    for r in rows:
        print(f"{r.get('mode', 'engine'):<7} {r['batch']:>6} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
              f"{r['candidates_per_s']:>12,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
