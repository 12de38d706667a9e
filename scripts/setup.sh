#!/usr/bin/env bash
# Create .venv (Python 3.11) and install loka with its test extras at the pinned versions.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "loka setup: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip "setuptools>=77" wheel
.venv/bin/python -m pip install --quiet -c requirements/pins.txt -e ".[dev]"
echo "loka setup: $(.venv/bin/python -c 'import torch, loka; print("loka", loka.__version__, "torch", torch.__version__)')"
