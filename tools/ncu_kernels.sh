#!/bin/sh
# Nsight Compute profiles of the Hopper kernels at the V3.2 prefill shape (S 4096, SKV 8192, h 128,
# topk 2048, bf16), one launch each, for the limits the NOTES.md files name but have not measured:
#   sh tools/ncu_kernels.sh OUT_DIR [KERNELS]
# KERNELS: comma-separated subset of gluon (Triton's Gluon forward), wgmma (CuPy's wgmma forward),
# mma (CuPy's mma.sync forward, for comparison), paged (Triton's paged indexer at b 64, T 128K),
# fp8, fp8_v2, fp8_pair, fp8_v3 and fp8_pair_v3 (CuPy's wgmma forwards over the packed FP8 cache at the decode
# shape b 64, s_q 2, T 32K, with the SourceCounters section too: besides the text report, each report is saved
# and its source page written as OUT_DIR/ncu_<kernel>_source.csv, the per-instruction stall samples that
# tools/ncu_stalls.py summarizes).
# Sections: speed of light, compute and memory workload, occupancy, warp state (stall reasons), launch
# statistics; written as OUT_DIR/ncu_<kernel>.txt (ncu's text report); the launch profiled is the
# second (the first compiles and warms up).
set -u
OUT=$1
KERNELS=${2:-gluon,wgmma,mma,paged}
mkdir -p "$OUT"
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats"

run_one() {  # name, kernel-name regex, python snippet that launches it (after one warm-up call)
  # shellcheck disable=SC2086
  timeout "${NCU_TIMEOUT:-240}" ncu --target-processes all -k "regex:$2" -s 1 -c 1 $SECTIONS ${EXTRA_SECTIONS:-} \
    python3 -c "$3" \
    > "$OUT/ncu_$1.txt" 2>&1
  echo "$1 rc=$?"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Stall|Issue Slot|No Eligible" \
    "$OUT/ncu_$1.txt" | head -n 30
}

PREFILL='
import torch, dsa_ref
torch.manual_seed(0)
s, s_kv, h, topk = 4096, 8192, 128, 2048
q = torch.randn(s, h, 576, dtype=torch.bfloat16, device="cuda") / 10
kv = torch.randn(s_kv, 576, dtype=torch.bfloat16, device="cuda") / 10
indices = torch.randint(0, s_kv, (s, topk), dtype=torch.int32, device="cuda")
'
has() { case ",$KERNELS," in *",$1,"*) return 0 ;; esac; return 1; }
if has gluon; then
  run_one gluon "sparse_mla_gluon" "$PREFILL
from dsa_ref_backends.torch_triton import sparse_mla
for _ in range(2): sparse_mla.sparse_mla(q, kv, indices, 576**-0.5, 512, kernel='gluon')
torch.cuda.synchronize()"
fi
if has wgmma; then
  run_one wgmma "sparse_mla_fwd_wgmma" "$PREFILL
for _ in range(2): dsa_ref.sparse_mla(q, kv, indices, backend='cupy')
torch.cuda.synchronize()"
fi
if has mma; then
  DSA_REF_CUPY_WGMMA=0 run_one mma "sparse_mla_fwd_mma" "$PREFILL
for _ in range(2): dsa_ref.sparse_mla(q, kv, indices, backend='cupy')
torch.cuda.synchronize()"
fi
DECODE='
import sys, torch, dsa_ref
sys.path.insert(0, "tools")
from opt_in_bench import fp8_decode_inputs
q, cache, slots = fp8_decode_inputs(torch, 64, 2, 32768)
'
for variant in fp8 fp8_v2 fp8_pair fp8_v3 fp8_pair_v3; do
  if has $variant; then
    v2=$([ $variant = fp8 ] && echo 0 || echo 1)
    pair=$(case $variant in *pair*) echo 1 ;; *) echo 0 ;; esac)
    v3=$(case $variant in *v3) echo 1 ;; *) echo 0 ;; esac)
    DSA_REF_CUPY_WGMMA_FP8_V2=$v2 DSA_REF_CUPY_WGMMA_FP8_PAIR=$pair DSA_REF_CUPY_WGMMA_SPLIT_V=$v3 \
      EXTRA_SECTIONS="--section SourceCounters --import-source no -o $OUT/ncu_$variant -f" \
      run_one $variant "sparse_mla_fwd_wgmma_fp8" "$DECODE
for _ in range(2): dsa_ref.sparse_mla(q, cache, slots, backend='cupy')
torch.cuda.synchronize()"
    # A saved report prints nothing: its text report (the sections) and its source page come from the file.
    ncu -i "$OUT/ncu_$variant.ncu-rep" --page details > "$OUT/ncu_$variant.txt" 2>&1
    grep -E "Duration|Issue Slot|No Eligible" "$OUT/ncu_$variant.txt" | head -n 6
    ncu -i "$OUT/ncu_$variant.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${variant}_source.csv" 2>&1 &&
      python3 tools/ncu_stalls.py "$OUT/ncu_${variant}_source.csv" --top 12
    rm -f "$OUT/ncu_$variant.ncu-rep"
  fi
done
if has paged; then
  run_one paged "_paged_indexer_kernel" "
import torch, dsa_ref.torch as dsa_torch
from dsa_ref_backends.bench import decode_step_inputs
x = decode_step_inputs(torch, 64, 131072)
for _ in range(2):
    dsa_torch.lightning_indexer_paged(x['q_index'], x['weights'], x['index_cache'], x['block_table'],
                                      x['context_lens'], backend='triton')
torch.cuda.synchronize()"
fi
