#!/usr/bin/env bash
# Every GPU check in one call (../shared/design/GPU.md), sized for a short lease: done within
# 6 minutes of starting on an H100/H200, install and autotuning included. Phases, in order:
# environment; correctness of every kernel in bf16/fp16/fp32 against float64; linear vs cuBLAS
# at LLaMa-7B shapes; attention vs SDPA flash at head dim 128; norms and convs; per-block
# F/P1/P2 of a LLaMa-7B, a BERT-Large and a Mamba-1.4B block; the simulator's 4-stage prediction. Each phase
# writes its files into OUT_DIR as soon as it ends, and OUT_DIR/summary.md (one screen) after
# every phase, so a timeout still leaves data. See twobp/benchmarks/gpu_check.py.
#
#   bench/gpu_check.sh [OUT_DIR]          on a GPU machine (no network: installs with --no-deps)
#   bench/gpu_check.sh --dry-run [OUT]    on a CPU: the same script at tiny sizes, interpreter
#
# GPU_CHECK_BUDGET (seconds, default 360) is the whole budget; the Python part gets what the
# install leaves, less 20 s of margin, and is stopped (TERM, then KILL) if it overruns.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "PYTHON: the interpreter (default python3; with --dry-run, the repo's .venv/bin/python if there is one)."
  exit 0
fi
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-360}
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
# a CPU dry run uses this checkout's virtualenv when it has one; on the GPU machine, its own python3
if [ ${#dry[@]} -gt 0 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
out=${1:-${OUT:-}}
[ -n "${TWOBP_SKIP_INSTALL:-}" ] || "$PY" -m pip install -q --no-deps --no-build-isolation -e . || {
  echo "gpu_check: 'pip install --no-deps --no-build-isolation -e .' failed (needs setuptools>=64)" >&2; exit 2; }
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # Triton 3.9's default, without its warning
args=("${dry[@]}")
[ -n "$out" ] && args+=(--out "$out")
if [ ${#dry[@]} -gt 0 ]; then
  exec "$PY" -m twobp.benchmarks.gpu_check "${args[@]}"
fi
installed=$(date +%s)
left=$(( start + budget - installed ))
echo "gpu_check: install took $(( installed - start )) s; $left s left of $budget"
set +e
timeout --signal=TERM --kill-after=10 "$(( left - 5 ))" \
  "$PY" -m twobp.benchmarks.gpu_check "${args[@]}" --deadline "$(( start + budget - 20 ))"
rc=$?
set -e
[ "$rc" -eq 124 ] && echo "gpu_check: stopped at the time limit; the phases that finished are in the output folder" >&2
echo "gpu_check: $(( $(date +%s) - start )) s in all"
exit "$rc"
