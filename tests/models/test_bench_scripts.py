"""The ranker's benchmark scripts still run (tiny shapes, a few iterations): they must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_runs_engine_and_http(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--size", "tiny", "--batch-sizes",
                    "1,8", "--iters", "3", "--warmup", "1", "--threads", "1", "--http", "--clients", "2",
                    "--requests", "2", "--json", str(out)], check=True, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in rows)
