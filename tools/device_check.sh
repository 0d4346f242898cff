#!/bin/sh
# One call on a GPU machine, from a copy of the repository: install dsa-ref, then check every GPU
# backend end to end and benchmark them side by side.
#   sh tools/device_check.sh OUT_DIR [CONFORMANCE_EXAMPLES_PER_OP]
# Writes OUT_DIR/device_check.log, OUT_DIR/{gpu_tests,conformance}.xml and OUT_DIR/bench/{bench.json,bench.md,bench.png}.
set -u
OUT=$1
EXAMPLES=${2:-1000}
LOG=$OUT/device_check.log
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { printf '\n===== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$LOG"; }

step "install"
python3 -m pip install -q --no-deps --no-build-isolation . >>"$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"
step "dsa-ref info"
python3 -m dsa_ref info >>"$LOG" 2>&1
for backend in triton cupy; do
  step "DSA_BACKEND=$backend dsa-ref demo"
  DSA_BACKEND=$backend python3 -m dsa_ref demo >>"$LOG" 2>&1; echo "rc=$?" >>"$LOG"
done
step "GPU tests: real shapes, NaN-poisoned outputs, repeated runs, the DSA layer (pytest -m gpu)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/ --junitxml="$OUT/gpu_tests.xml" >>"$LOG" 2>&1
echo "rc=$?" >>"$LOG"
step "conformance, thorough profile, $EXAMPLES examples per op in 8 shards"
DSA_CONFORMANCE_MAX_EXAMPLES=$EXAMPLES DSA_CONFORMANCE_SHARDS=8 timeout 420 python3 -m pytest -q -p no:cacheprovider \
  -n 14 -rA -W ignore tests/test_conformance.py --dsa-backend triton,cupy --dsa-profile thorough \
  --junitxml="$OUT/conformance.xml" >>"$LOG" 2>&1
echo "rc=$?" >>"$LOG"
step "compute-sanitizer memcheck and racecheck: every top-k path of both backends, small"
for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool $tool --print-limit 20 python3 tools/topk_tune.py --small >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
done
step "benchmark, both backends in one run"
timeout 300 python3 -m dsa_ref bench --backend triton,cupy --out "$OUT/bench" 2>&1 | tail -n 60 >>"$LOG"
step "done"
