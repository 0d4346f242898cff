#!/bin/sh
# One GPU call for the training ops (and everything a change to the kit touches), from a checkout:
#   sh tools/training_check.sh OUT_DIR PHASES [CONFORMANCE_EXAMPLES_PER_OP] [PREVIOUS_OUT_DIR]
# PHASES is a comma-separated subset of: install, tests, conformance, sanitize, bench, peers, opt-in, opt-in-bench
#   tests        every GPU test (pytest -m gpu): real shapes, NaN-poisoned outputs, determinism, graphs, compile
#                (TESTS_TIMEOUT seconds, 520 unless set)
#   conformance  the thorough profile on triton and cupy, every op the kit checks, in 8 shards
#   sanitize     compute-sanitizer memcheck and racecheck on small cases of the training kernels
#   bench        dsa-ref bench --cases training,host on both backends
#   peers        TileLang's sparse MLA backward beside ours (needs tilelang installed, TL_EXAMPLES)
#   opt-in       the newest kernels (NEW_KERNELS: opt_in_probe.py's names; NEW_KERNEL_TESTS: their test
#                files): first runs in child processes, their GPU tests and compute-sanitizer on them
#   opt-in-bench tools/opt_in_bench.py: the same kernels beside the defaults they would replace
# Writes OUT_DIR/training_check.log, junit XML files, bench/ and peers_training.json.
# Run "tests" and "conformance" in calls of their own: each takes most of a call's ten minutes, and
# both lean on the CPU (float64 references), so together they slow each other past the limit.
# Both log one line per test (pytest -v); PREVIOUS_OUT_DIR is the OUT_DIR of an earlier call whose
# logs list tests that already passed: they are deselected, so a cut run resumes where it stopped.
set -u
OUT=$1
PHASES=${2:-install,tests,conformance,sanitize,bench}
EXAMPLES=${3:-1000}
PREVIOUS=${4:-}
LOG=$OUT/training_check.log
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { printf '\n===== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$LOG"; }
has() { case ",$PHASES," in *",$1,"*) return 0 ;; esac; return 1; }
# --deselect arguments for the tests that PASSED in the previous call's log $1 (pytest -v lines).
passed_before() {
  [ -n "$PREVIOUS" ] && [ -f "$PREVIOUS/$1" ] || return 0
  sed -n 's/.*PASSED \(tests\/[^ ]*\).*/--deselect \1/p' "$PREVIOUS/$1" | sort -u | tr '\n' ' '
}

if has install; then
  step "install"
  python3 -m pip install -q --no-deps --no-build-isolation . >>"$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"
  python3 -m dsa_ref info >>"$LOG" 2>&1
fi
if has tests; then
  step "GPU tests (pytest -m gpu)"
  # shellcheck disable=SC2046
  timeout "${TESTS_TIMEOUT:-520}" python3 -m pytest -v -p no:cacheprovider -n 6 -m gpu -rfE --tb=short --durations=20 tests/ \
    $(passed_before gpu_tests.log) --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
  echo "rc=$?" | tee -a "$LOG"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -n 30 >>"$LOG"
fi
if has conformance; then
  step "conformance, thorough profile, $EXAMPLES examples per op in 8 shards"
  # One BLAS thread a worker: 14 workers' float64 references, each with a BLAS pool the size of the
  # machine, would oversubscribe its 16 cores many times over.
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  DSA_CONFORMANCE_MAX_EXAMPLES=$EXAMPLES DSA_CONFORMANCE_SHARDS=8 timeout 540 python3 -m pytest -v -p no:cacheprovider \
    -n 14 -rfE --tb=short -W ignore --durations=20 tests/test_conformance.py --dsa-backend triton,cupy \
    --dsa-profile thorough $(passed_before conformance.log) --junitxml="$OUT/conformance.xml" >"$OUT/conformance.log" 2>&1
  echo "rc=$?" | tee -a "$LOG"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/conformance.log" | tail -n 30 >>"$LOG"
fi
if has sanitize; then
  step "compute-sanitizer on the training kernels (small cases)"
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 python3 -m pytest -q \
      -p no:cacheprovider -x tests/test_triton_training.py -k "not OnGpu and not gpu" >>"$LOG" 2>&1
    echo "triton $tool rc=$?" | tee -a "$LOG"
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 python3 -m pytest -q \
      -p no:cacheprovider -x tests/test_cupy_training.py -k sanitizer >>"$LOG" 2>&1
    echo "cupy $tool rc=$?" | tee -a "$LOG"
  done
fi
if has bench; then
  step "benchmark: training and host-cost groups, both backends"
  timeout 300 python3 -m dsa_ref bench --backend triton,cupy --cases training,host --out "$OUT/bench" 2>&1 \
    | tail -n 40 >>"$LOG"
fi
if has peers; then
  step "TileLang's sparse MLA backward beside ours"
  timeout 300 python3 tools/peers_training.py --out "$OUT" >>"$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
fi
if has opt-in; then
  step "new kernels: first runs in child processes, GPU tests, sanitizers"
  # The kernels most recently written or made defaults (docs/pages/backends/choosing.md lists them;
  # NEW_KERNELS and NEW_KERNEL_TESTS choose others). A new mbarrier protocol can hang: the probe runs
  # each kernel in a child process with a time limit, and each test file gets a limit of its own.
  KERNELS=${NEW_KERNELS:-gluon_pingpong,gluon_det,radix_topk,paged_v2,wgmma_v2,wgmma_det}
  timeout 200 python3 tools/opt_in_probe.py --out "$OUT/opt_in_probe.json" --kernels "$KERNELS" \
    --timeout 60 >"$OUT/opt_in_probe.log" 2>&1
  echo "probe rc=$?" | tee -a "$LOG"
  TESTS=${NEW_KERNEL_TESTS:-"tests/test_triton_gluon_pingpong.py tests/test_triton_topk_radix.py tests/test_cupy_wgmma_v2.py
    tests/test_cupy_backward_wgmma_deterministic.py tests/test_triton_gluon_backward_deterministic.py tests/test_cupy_paged_indexer_v2.py"}
  for file in $TESTS; do
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short "$file" >>"$OUT/opt_in_tests.log" 2>&1
    echo "$file rc=$?" | tee -a "$LOG"
  done
  grep -E "FAILED|ERROR|passed|failed" "$OUT/opt_in_tests.log" | tail -n 30 >>"$LOG"
  # racecheck's hazard report names the shared-memory address and threads of each hazard.
  for tool in memcheck "racecheck --racecheck-report hazard"; do
    for kernel in $(echo "$KERNELS" | tr ',' ' '); do
      # shellcheck disable=SC2086
      timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 0 python3 tools/opt_in_probe.py \
        --child $kernel >>"$OUT/opt_in_${tool%% *}.log" 2>&1
      echo "$kernel ${tool%% *} rc=$?" | tee -a "$LOG"
    done
    grep -E "SUMMARY" "$OUT/opt_in_${tool%% *}.log" | tail -n 12 >>"$LOG"
  done
  # Hazards in Triton's own warp-specialization dispatch apart from the kernels' (tools/racecheck_report.py).
  python3 tools/racecheck_report.py "$OUT/opt_in_racecheck.log" >"$OUT/opt_in_racecheck_report.json"
  echo "racecheck report rc=$? (0: no hazard of the kernels' own)" | tee -a "$LOG"
fi
if has opt-in-bench; then
  step "opt-in kernels timed beside the defaults they would replace"
  timeout 300 python3 tools/opt_in_bench.py --out "$OUT/opt_in_bench.json" \
    --groups triton-forward-pingpong,triton-topk,triton-backward,cupy-forward,cupy-backward,cupy-indexer >>"$LOG" 2>&1
  echo "bench rc=$?" | tee -a "$LOG"
fi
step "done"
tail -n 60 "$LOG"
