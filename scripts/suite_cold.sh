#!/usr/bin/env bash
# The test suite as a newcomer or a fresh CI machine meets it: a fresh clone of HEAD, empty
# compile and looped caches (inductor, tokenizers, the CPU peak), the venv of this checkout.
# Prints pytest's own wall time and the 40 slowest tests. Run it on an idle machine: anything
# else running on the cores (a study, a benchmark) makes every figure meaningless.
#   bash scripts/suite_cold.sh [extra pytest args]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d /tmp/looped-cold.XXXXXX)"
git clone -q "$here" "$scratch/repo"
cd "$scratch/repo"
export TORCHINDUCTOR_CACHE_DIR="$scratch/inductor" LOOPED_CACHE="$scratch/looped-cache"
export HF_DATASETS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
"$here/.venv/bin/python" -m pytest -q -n 2 --dist loadfile -p no:cacheprovider \
    --durations=40 "$@"
echo "scratch: $scratch (delete it when done)"
