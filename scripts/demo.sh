#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `loka demo` on the bundled ranker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/loka demo "$@"
