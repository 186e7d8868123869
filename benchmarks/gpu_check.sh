#!/usr/bin/env bash
# One prepared run on a GPU machine (torch and triton preinstalled, no network):
#   install fastlora without dependencies, run the GPU kernel tests, `fastlora check` and the
#   default `fastlora bench` (issue 3's run); with MORE=1 also the production GPU tests
#   (torch.compile, autocast, checkpointing on CUDA) and the r=64 and dropout-0.1 headline rows
#   (issue 6); with SWEEP=1 the config sweep. Everything lands in the folder $1, in at most 8 files
#   (what the device tool brings back): machine.txt (with the diagnostics), gpu_tests.log,
#   check.log, bench.json, bench.png, bench.log (every bench table), bench_r64.json, sweep.log.
# Time: the steps' timeouts add up to 5.7 minutes, 8.5 with MORE=1, 10 with both (one device
# call's limit: lower the others then). On the H100 of 2026-11-26 the kernel tests took 70 s.
# TEST_TIMEOUT, COMPILE_TIMEOUT, MORE_TIMEOUT and SWEEP_TIMEOUT fit it to the device budget left.
# Usage: [MORE=1] [SWEEP=1] benchmarks/gpu_check.sh OUTDIR
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
timeout 40 $PY benchmarks/gpu_diag.py >> "$OUT_DIR/machine.txt" 2>&1 || status=1
tail -12 "$OUT_DIR/machine.txt"

step "GPU tests"
timeout ${TEST_TIMEOUT:-100} $PY -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25 || status=1

step "fastlora check"
timeout 60 $PY -m fastlora check > "$OUT_DIR/check.log" 2>&1 || status=1
grep -E "FAIL|failure" "$OUT_DIR/check.log" | tail -15

step "fastlora bench (default)"
timeout 140 $PY -m fastlora bench --quiet --json "$OUT_DIR/bench.json" --plot "$OUT_DIR/bench.png" 2>&1 | tee "$OUT_DIR/bench.log" || status=1

if [ "${MORE:-0}" = "1" ]; then
  step "GPU tests of the production features (torch.compile, autocast, checkpointing on CUDA)"
  timeout ${COMPILE_TIMEOUT:-100} $PY -m pytest -q -m gpu tests/test_gpu_compile.py 2>&1 | tee -a "$OUT_DIR/gpu_tests.log" | tail -25 || status=1

  step "fastlora bench: r=64, then dropout 0.1 at r=16 (M=2048 and 8192, in=out=4096)"
  timeout ${MORE_TIMEOUT:-35} $PY -m fastlora bench --quiet --preset llama-7b --M 2048 8192 --rank 64 --json "$OUT_DIR/bench_r64.json" 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1
  timeout ${MORE_TIMEOUT:-35} $PY -m fastlora bench --quiet --shape 2048,4096,4096 --shape 8192,4096,4096 --dropout 0.1 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1
fi

if [ "${SWEEP:-0}" = "1" ]; then
  step "config sweep"
  timeout ${SWEEP_TIMEOUT:-90} $PY benchmarks/sweep_configs.py ${SWEEP_ARGS:-} > "$OUT_DIR/sweep.log" 2>&1 || status=1
fi
step "done, status $status"
exit $status
