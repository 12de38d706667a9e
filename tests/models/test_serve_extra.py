"""Serving is the loka[serve] extra: without it the core imports and `loka serve` says in one line
what to install (exit 2), and the ranker, the CLI and `loka doctor` still work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpu_machine import as_on_the_gpu_machine

ROOT = Path(__file__).resolve().parents[2]


def _python(tmp_path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=as_on_the_gpu_machine(tmp_path))


def test_core_imports_without_the_extras(tmp_path):
    proc = _python(tmp_path, "import loka, loka.probe, loka.dispatch, loka.mods, loka.gate, loka.models, loka.app.cli\n"
                             "import sys\n"
                             "print(sorted(m for m in ('tqdm', 'pydantic', 'uvicorn', 'torchao') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_serve_without_the_extra_is_one_line_naming_the_install(tmp_path):
    proc = _python(tmp_path, "import sys\nfrom loka.app.cli import main\n"
                             "sys.exit(main(['serve', '--checkpoint', 'nowhere.pt']))")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'loka[serve]'" in lines[0] and "uvicorn" in lines[0], lines
