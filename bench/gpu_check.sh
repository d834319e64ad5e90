#!/usr/bin/env bash
# Every GPU check in one call (../shared/design/GPU.md): environment, correctness of every
# Triton kernel in fp32/fp16/bf16, microbenchmarks against torch, per-layer F/P1/P2 costs and
# the predicted 4-stage pipeline gain. Finishes well inside 8 minutes on an H100.
#
#   bench/gpu_check.sh [OUT_DIR]          on a GPU machine (no network: installs with --no-deps)
#   bench/gpu_check.sh --dry-run [OUT]    on a CPU: the same script at tiny sizes, interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
out=${1:-${OUT:-}}
[ -n "${TWOBP_SKIP_INSTALL:-}" ] || "$PY" -m pip install -q --no-deps --no-build-isolation -e . || {
  echo "gpu_check: 'pip install --no-deps --no-build-isolation -e .' failed (needs setuptools>=64)" >&2; exit 2; }
export PYTHONUNBUFFERED=1
args=("${dry[@]}")
[ -n "$out" ] && args+=(--out "$out")
exec "$PY" -m twobp.benchmarks.gpu_check "${args[@]}"
