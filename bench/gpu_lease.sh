#!/usr/bin/env bash
# Everything a short GPU lease should run, as one device call that fits the device tool's limits:
# bench/gpu_check.sh (correctness of every kernel, kernel and block timings, the prediction), then
# the block profile at 8 sequences per micro-batch (wall vs GPU kernel time) and the host-path
# profile against torch's own layer, and eager against CUDA-graph replay (bench/gpu_graphs.py).
# The files go back as OUT/gpu.tgz plus OUT/summary.md, OUT/blocks.md and OUT/graphs.md, since the
# tool returns at most 8 files. About 8 minutes on an H200.
#
#   bench/gpu_lease.sh OUT            on the GPU machine (run's $OUT); then here:
#   mkdir -p bench/results/<card>-<date> && tar xzf OUT/gpu.tgz -C bench/results/<card>-<date>
#   bench/gpu_lease.sh --dry-run OUT  the same on a CPU, tiny sizes
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "PYTHON: the interpreter (default python3; with --dry-run, the repo's .venv/bin/python if there is one)."
  exit 0
fi
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
out=${1:?usage: bench/gpu_lease.sh [--dry-run] OUT}
if [ ${#dry[@]} -gt 0 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then export PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  > "$work/0-smi.txt" 2>&1
GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-300} bash bench/gpu_check.sh "${dry[@]}" "$work" > "$work/run.log" 2>&1
echo "gpu_check exit $?" >> "$work/run.log"
timeout 150 "$PY" bench/gpu_profile_blocks.py "${dry[@]}" --batch 8 --reps 3 \
  --out "$work/profile-b8" 2>&1 | grep -v -e USDT -e _warn_once > "$work/profile-b8.log"
timeout 90 "$PY" bench/gpu_host_overhead.py "${dry[@]}" --out "$work" > "$work/host.log" 2>&1
timeout 240 "$PY" bench/gpu_graphs.py "${dry[@]}" --out "$work" > "$work/graphs.log" 2>&1
tar czf "$out/gpu.tgz" -C "$work" .
cp "$work/summary.md" "$out/" 2>/dev/null
cp "$work/profile-b8/blocks.md" "$work/graphs.md" "$out/" 2>/dev/null
echo "gpu_lease: $(( $(date +%s) - start )) s; files in $out"
cat "$work/summary.md" "$work/profile-b8/blocks.md" "$work/graphs.md" 2>/dev/null
