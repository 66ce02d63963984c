#!/usr/bin/env bash
# The first GPU run (scripts/gpu_run.py): bash scripts/gpu_run.sh OUT [key=value ...]
#
# Installs wheels/ (scripts/offline_wheels.sh made it) into OUT/site with no network, then runs
# every stage under an 11-minute limit. The package runs from this checkout, uninstalled.
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_run.sh OUT [key=value ...]}
shift
mkdir -p "$OUT"
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ -z "${PY_FROM_ENV:-}" ] && PY=.venv/bin/python
if ls wheels/*.whl > /dev/null 2>&1; then
  if "$PY" -m pip install --no-index --no-deps --target "$OUT/site" wheels/*.whl \
      > "$OUT/pip.log" 2>&1; then
    echo "PASS: $(ls wheels/*.whl | wc -l) wheels from wheels/ into $OUT/site" > "$OUT/wheels.txt"
  else
    echo "FAIL: pip install from wheels/ (see $OUT/pip.log)" > "$OUT/wheels.txt"
  fi
  export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 660 "$PY" scripts/gpu_run.py out="$OUT" "$@"
