"""Counters the scoring service exposes at GET /metrics, in Prometheus' text format.

Kept by the service's event loop (one thread), so plain integers suffice; the batcher's
counts are read from it when rendered.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ServeMetrics:
    """Requests by path and status, /score latency histogram, requests in flight (and peak)."""

    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0
        self.inflight = 0
        self.inflight_peak = 0

    def enter(self) -> None:
        self.inflight += 1
        self.inflight_peak = max(self.inflight_peak, self.inflight)

    def leave(self) -> None:
        self.inflight -= 1

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.responses[(path if path in ("/score", "/health", "/metrics") else "other", status)] += 1
        if path == "/score":
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self.latency_sum += seconds

    def render(self, batches_run: int, examples_scored: int, connections: int) -> str:
        lines = ["# TYPE loka_serve_responses_total counter"]
        for (path, status), n in sorted(self.responses.items()):
            lines.append(f'loka_serve_responses_total{{path="{path}",status="{status}"}} {n}')
        lines.append("# TYPE loka_serve_score_seconds histogram")
        total = 0
        for le, n in zip((*LATENCY_BUCKETS_S, "+Inf"), self.latency_counts):
            total += n
            lines.append(f'loka_serve_score_seconds_bucket{{le="{le}"}} {total}')
        lines += [f"loka_serve_score_seconds_sum {self.latency_sum:.6f}", f"loka_serve_score_seconds_count {total}"]
        gauges = {"loka_serve_inflight": self.inflight, "loka_serve_inflight_peak": self.inflight_peak,
                  "loka_serve_connections": connections, "loka_serve_batches_total": batches_run,
                  "loka_serve_examples_scored_total": examples_scored, "process_resident_memory_bytes": rss_bytes()}
        for name, value in gauges.items():
            if value is not None:
                kind = "counter" if name.endswith("_total") else "gauge"
                lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
