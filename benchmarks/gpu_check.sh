#!/usr/bin/env bash
# One prepared run on a GPU machine (torch and triton preinstalled, no network):
#   install fastlora without dependencies, run the GPU tests, `fastlora check`, the default
#   `fastlora bench`, and (unless QUICK=1) the config sweep. Everything lands in the folder $1.
# Usage: benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
OUT_DIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT_DIR/machine.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/machine.txt"

step "install (no deps, no network)"
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2

step "diagnostics (operand layouts, launch overhead)"
timeout 50 $PY benchmarks/gpu_diag.py > "$OUT_DIR/diag.log" 2>&1 || status=1
tail -12 "$OUT_DIR/diag.log"

step "GPU tests"
timeout ${TEST_TIMEOUT:-110} $PY -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25 || status=1

step "fastlora check"
timeout 70 $PY -m fastlora check > "$OUT_DIR/check.log" 2>&1 || status=1
grep -E "FAIL|failure" "$OUT_DIR/check.log" | tail -15

step "fastlora bench (default)"
timeout 150 $PY -m fastlora bench --quiet --json "$OUT_DIR/bench.json" --plot "$OUT_DIR/bench.png" 2>&1 | tee "$OUT_DIR/bench.log" || status=1

if [ "${QUICK:-0}" != "1" ]; then
  step "config sweep"
  timeout ${SWEEP_TIMEOUT:-150} $PY benchmarks/sweep_configs.py ${SWEEP_ARGS:-} > "$OUT_DIR/sweep.log" 2>&1 || status=1
fi
step "done, status $status"
exit $status
