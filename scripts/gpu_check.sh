#!/usr/bin/env bash
# One pass/fail line per GPU check (bf16 training, xformers vs SDPA, FSDP2 on NCCL, compile,
# CUDA-graph decode, MFU of a 360M step); under 5 minutes on one GPU. Never part of CI.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 300 "$PY" scripts/gpu_check.py
