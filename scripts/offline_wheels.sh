#!/usr/bin/env bash
# The wheels scripts/gpu_run.sh needs on a node without network (scripts/gpu_wheels.txt), for the
# node's Python and platform, into a git-ignored folder that travels with the repository:
#
#   bash scripts/offline_wheels.sh                       # wheels/, Python 3.12, manylinux x86_64
#   PYTHON_VERSION=3.11 DEST=/tmp/w bash scripts/offline_wheels.sh
#   EXTRA=xformers bash scripts/offline_wheels.sh        # also xformers (~100 MB and more: over
#                                                        # the 64 MiB a 15-minute node accepts)
#
# Binary wheels for the target come from the index; a requirement published only as a source
# archive (antlr4-python3-runtime, pure Python) is built into a py3-none-any wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-wheels}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DEST"
reqs=$(grep -v '^\s*#' scripts/gpu_wheels.txt | sed '/^\s*$/d')
for req in $reqs ${EXTRA:-}; do
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
      --python-version "$PYTHON_VERSION" --platform "$PLATFORM" --implementation cp "$req"; then
    echo "no binary wheel for $req: building a pure-Python one"
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DEST" "$req"
  fi
done
ls -l "$DEST"
du -sh "$DEST"
