#!/usr/bin/env bash
# The prepared GPU run (torch and triton preinstalled, no network): one device call of at most
# 8 minutes writing at most 8 files to the folder $1. The cheapest, most wanted numbers come first,
# so a run cut short still measures the newest state:
#
#   machine.txt       GPU, versions, diagnostics (ceilings, main loop vs cuBLAS, passes vs copy
#                     bandwidth, host time and launches per call)
#   bench.log         every table printed below
#   bench_routes.json the layer bench per route at the headline shapes (bf16, r=16, M 2048/8192)
#   route_table.json  benchmarks/tune_routes.py's table for this GPU (then used by the runs below)
#   gpu_tests.log     pytest -m gpu (compile/autocast/checkpoint on CUDA, kernels at real sizes,
#                     CUDA graph capture of a training step, the 4-bit kernels in bf16), with the
#                     slowest tests' durations
#   check.log         fastlora check --quick (a row of each kind: LoRA, DoRA, QLoRA, dropout)
#   model.json        the model bench (Llama-3-8B-wide layers, 8192 tokens a step)
#   bench.json        the layer bench at the bars: base, PEFT, fastlora at M 2048/8192,
#                     4096 -> 4096 / 14336, r 16 and 64 (dropout 0.1 and decode in bench.log)
#
# With the device time left after it (15 minutes a session in all): benchmarks/sweep_passes.py
# (1-2 minutes), the passes' configs against the copy bandwidth, which no run has swept yet, and
# the whole `fastlora check` (a few minutes of first compiles).
#
# Usage: benchmarks/gpu_check.sh OUTDIR   (each step has its own timeout; they add up to 480 s, the
# first bench's including the kernels' first compiles)
set -uo pipefail
OUT_DIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }
BENCH="$PY -m fastlora bench --quiet --rep 40"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT_DIR/machine.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/machine.txt"

step "install (no deps, no network)"
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2

step "layer bench per route, headline shapes (bf16, r=16)"
timeout 65 $BENCH --shape 8192,4096,4096 --shape 8192,4096,14336 --shape 2048,4096,4096 \
  --providers base peft fastlora-torch fastlora-fused fastlora-split \
  --json "$OUT_DIR/bench_routes.json" 2>&1 | tee "$OUT_DIR/bench.log" || status=1

step "route table (benchmarks/tune_routes.py --quick)"
cp fastlora/route_table.json "$OUT_DIR/route_table.json"
timeout 75 $PY benchmarks/tune_routes.py --quick --rep 25 --out "$OUT_DIR/route_table.json" 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1
rm -f "$OUT_DIR/route_table.json.tmp"  # (left only if the timeout struck mid-write)
cp "$OUT_DIR/route_table.json" fastlora/route_table.json  # the runs below choose from it

step "diagnostics"
timeout 40 $PY benchmarks/gpu_diag.py >> "$OUT_DIR/machine.txt" 2>&1 || status=1
tail -40 "$OUT_DIR/machine.txt"

# First the code no GPU has run yet (on 2026-11-29 the H200's 120 s ended after 72 tests of
# test_gpu.py): the split passes' in-pass sums, dY B in dX's loop, the persistent TMA and the
# warp-specialized GEMMs, training steps under CUDA graph capture. Then the rest, the compile
# tests first (on 2026-11-29 they never ran past the first failure).
step "GPU tests"
NEW="split_passes_sum or dyb_in_the_loop or persistent_tma or warp_specialized or cuda_graph"
timeout 60 $PY -m pytest -q -m gpu -k "$NEW" --durations=8 tests/test_gpu.py 2>&1 \
  | tee "$OUT_DIR/gpu_tests.log" | tail -12 || status=1
timeout 60 $PY -m pytest -q -m gpu -k "not ($NEW)" --durations=15 tests/test_gpu_compile.py tests/test_gpu.py \
  tests/test_dequant.py tests/test_linear4bit.py 2>&1 | tee -a "$OUT_DIR/gpu_tests.log" | tail -25 || status=1

# --quick: a row of each kind (the whole list's first compiles took more than 40 s on the H200)
step "fastlora check --quick"
timeout 45 $PY -m fastlora check --quick > "$OUT_DIR/check.log" 2>&1 || status=1
grep -E "FAIL|failure" "$OUT_DIR/check.log" | tail -15

step "model bench (Llama-3-8B-wide layers, 8192 tokens)"
timeout 50 $BENCH --model llama3-8b --json "$OUT_DIR/model.json" 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1

step "layer bench at the bars: M 2048/8192, r 16/64; dropout 0.1; decode"
timeout 25 $BENCH --preset bars --M 2048 8192 --rank 16 64 --providers base peft fastlora \
  --json "$OUT_DIR/bench.json" 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1
timeout 10 $BENCH --preset bars --M 8192 --dropout 0.1 --providers base peft fastlora \
  2>&1 | tee -a "$OUT_DIR/bench.log" || status=1
timeout 10 $BENCH --preset bars --M 1 16 --mode fwd --providers base peft fastlora \
  2>&1 | tee -a "$OUT_DIR/bench.log" || status=1

step "DoRA"
timeout 15 $BENCH --dora --rank 16 --shape 8192,4096,4096 --shape 8192,4096,14336 --mode fwd full \
  --providers fastlora fastlora-dora peft-dora 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1

step "QLoRA (nf4 base; PEFT's needs bitsandbytes' wheel carried in .whl/)"
ls .whl/bitsandbytes-*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
timeout 25 $BENCH --base nf4 --shape 16,4096,4096 --shape 16,4096,14336 --shape 8192,4096,4096 \
  --shape 8192,4096,14336 --providers base peft fastlora fastlora-fused 2>&1 | tee -a "$OUT_DIR/bench.log" || status=1

step "done, status $status"
exit $status
