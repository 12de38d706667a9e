#!/usr/bin/env bash
# Create .venv (Python 3.11) and install loka with its test extras and every optional extra
# (serve, torchao, progress, plots, triton) at the pinned versions, as CI needs them all.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "loka setup: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
# The package is installed editable, so only a change of pyproject.toml or the pins needs a reinstall.
STAMP=.venv/.loka-setup-stamp
WANT=$(cat pyproject.toml requirements/pins.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import loka" 2>/dev/null; then
    echo "loka setup: already installed for this pyproject.toml and pins (delete $STAMP to force a reinstall)"
else
    .venv/bin/python -m pip install --quiet --upgrade pip "setuptools>=77" wheel
    .venv/bin/python -m pip install --quiet -c requirements/pins.txt -e ".[dev,all]"
    # TorchRec (extra `torchrec`, the sharded ranker): its metadata asks for the CUDA fbgemm_gpu,
    # so torchrec and the CPU build fbgemm-gpu-cpu go in without dependencies, then the rest.
    .venv/bin/python -m pip install --quiet --no-deps -c requirements/pins.txt torchrec fbgemm-gpu-cpu
    .venv/bin/python -m pip install --quiet -c requirements/pins.txt tensordict torchmetrics pyre-extensions
    echo "$WANT" > "$STAMP"
fi
echo "loka setup: $(.venv/bin/python -c 'import torch, loka; print("loka", loka.__version__, "torch", torch.__version__)')"
# A headless browser for the test that renders the probe report's HTML (tests/probe/test_probe_report_view.py).
# Installed from the system's packages once; the test skips with the reason where this cannot run.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "loka setup: installing chromium (apt-get) for the HTML report test"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
            || echo "loka setup: could not install chromium; the HTML rendering test will skip"
    else
        echo "loka setup: no chromium and no root apt-get here; the HTML rendering test will skip (apt-get install -y chromium)"
    fi
fi
