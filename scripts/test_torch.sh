#!/usr/bin/env bash
# Run loka's CPU test suite on another supported torch, in a side environment outside the repo,
# and record the result in tests/torch_versions.json (version, date, counts, command).
#
#   scripts/test_torch.sh 2.11                      # the whole suite (hours on a loaded 2-core machine)
#   scripts/test_torch.sh 2.15 tests/mods tests/core # a subset: the record says which paths ran
#
# The side environment is ${LOKA_TORCH_ENVS:-$HOME/.cache/loka/torch-envs}/torch-VERSION, built once
# (torch from the package index: a CUDA build that imports on CPU once its nvidia-* wheels are in,
# about 4.5 GB). Everything else comes at the versions of requirements/pins.txt; triton is the one
# that torch release asks for (2.11 -> 3.6, as the lent GPU machine has). A pip constraint file
# that caps torch (e.g. /etc/xdg/pip) is overridden for this environment only. VERSION equal to the
# torch of .venv (scripts/setup.sh) runs that environment instead of building one.
# Tests run with OMP_NUM_THREADS=1 under nice: this is background work.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ "$1" =~ ^2\.[0-9]+(\.[0-9]+)?$ ]]; then
    echo "usage: scripts/test_torch.sh VERSION [PYTEST PATHS/ARGS...]  (VERSION like 2.11 or 2.15.0)" >&2
    exit 2
fi
VERSION=$1; shift
REPO=$(pwd)
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
main_torch=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [[ -n "$main_torch" && ( "$main_torch" == "$VERSION" || "$main_torch" == "$VERSION".* ) ]]; then
    ENV=$REPO/.venv
    echo "loka test_torch: torch $main_torch is .venv's: running there"
else
    ENV=${LOKA_TORCH_ENVS:-$HOME/.cache/loka/torch-envs}/torch-$VERSION
    ENV=$(realpath -m "$ENV")
    case "$ENV/" in "$REPO"/*) echo "loka test_torch: $ENV is inside the repo; set LOKA_TORCH_ENVS to a folder outside it" >&2; exit 2;; esac
    if ! "$ENV/bin/python" -c "import torch, numpy, scipy, pytest, loka" 2>/dev/null; then
        echo "loka test_torch: building $ENV (torch $VERSION, several GB of downloads)"
        [ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
        : > "$ENV/no-constraints.txt"  # an empty constraint file in place of a site-wide torch cap
        export PIP_CONSTRAINT=$ENV/no-constraints.txt
        "$ENV/bin/python" -m pip install -q --upgrade pip "setuptools>=77" wheel
        spec="torch==$VERSION"; [[ "$VERSION" =~ ^2\.[0-9]+$ ]] && spec="torch==$VERSION.*"
        nice "$ENV/bin/python" -m pip install -q "$spec"
        grep -vE '^(torch|triton)==' requirements/pins.txt > "$ENV/pins-without-torch.txt"
        nice "$ENV/bin/python" -m pip install -q -c "$ENV/pins-without-torch.txt" -e ".[dev,all]"
    fi
fi
# the environment tests this checkout: its editable loka may point at the checkout that built it
# (asked of a mapped subpackage: the top-level loka/ is found on the working directory anyway)
if [ "$("$ENV/bin/python" -c 'import loka.probe, os; print(os.path.dirname(os.path.dirname(loka.probe.__file__)))' 2>/dev/null)" != "$REPO" ]; then
    echo "loka test_torch: pointing $ENV's loka at $REPO"
    PIP_CONSTRAINT=/dev/null "$ENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
fi
TORCH=$("$ENV/bin/python" -c 'import torch; print(torch.__version__)')
echo "loka test_torch: torch $TORCH in $ENV"
# An inductor cache of this run's own: runs at once (of one torch or two) sharing one corrupted it ('file too short').
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/loka-inductor-$VERSION-XXXXXX")}
JUNIT=$(mktemp "${TMPDIR:-/tmp}/loka-torch-$VERSION-XXXXXX.xml")
set +e
OMP_NUM_THREADS=1 nice "$ENV/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$JUNIT" "$@"
rc=$?
set -e
"$ENV/bin/python" scripts/torch_versions_record.py --junit "$JUNIT" --version "$VERSION" --rc "$rc" \
    --command "scripts/test_torch.sh $VERSION${*:+ $*}" --out tests/torch_versions.json
exit "$rc"
