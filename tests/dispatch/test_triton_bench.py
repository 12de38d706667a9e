"""The Triton benchmarks run end to end in their CPU dry-run mode (interpreter, tiny shapes).

Keeps bench/gemm_triton.py and bench/norm_quant.py from rotting on machines
without a GPU; says nothing about speed (their dry-run tables say so too).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from triton_interp_driver import ROOT


@pytest.mark.parametrize("script,rows", [("gemm_triton.py", 2), ("norm_quant.py", 2)])
def test_dry_run_writes_a_table(script, rows, tmp_path):
    out = tmp_path / "table.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --dry-run must set it itself
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)  # hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "NOT representative" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip()[:1].isdigit()]
    assert len(table) == rows, text
    assert "n/a" not in " ".join(line.split("|")[-2] for line in table), f"the last column must be filled:\n{text}"
