#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "loka test: pytest collected no tests" >&2
fi
exit "$rc"
