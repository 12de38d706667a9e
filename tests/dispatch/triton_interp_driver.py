"""Run a Triton test file in a subprocess with TRITON_INTERPRET=1 (helper, not a test).

Triton decides whether a kernel is compiled or interpreted when the kernel is
defined (at import), so the interpreter cannot be switched on inside a pytest
process that may already have imported the kernels. The test files therefore
mark their interpreter tests ``skipif(not INTERPRETING)`` and add one driver
test that re-runs the file in a fresh process with the variable set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SKIP_REASON = "runs in the TRITON_INTERPRET=1 subprocess started by this file's test_under_interpreter"


def run_file_under_interpreter(test_file: str, min_passed: int, timeout_s: int = 3600) -> None:
    """Run ``test_file``'s tests with TRITON_INTERPRET=1; fail with their output unless >= min_passed pass."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", str(test_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    tail = (proc.stdout[-8000:] + "\n" + proc.stderr[-4000:]).strip()
    if proc.returncode != 0:
        raise AssertionError(f"interpreter run failed (exit {proc.returncode}):\n{tail}")
    match = re.search(r"(\d+) passed", proc.stdout)
    passed = int(match.group(1)) if match else 0
    if passed < min_passed:
        raise AssertionError(f"interpreter run passed {passed} tests, expected at least {min_passed}:\n{tail}")
