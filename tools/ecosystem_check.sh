#!/bin/sh
# GPU calls for the ecosystem work, from a checkout (peers per ../shared/peers/README.md, in .peers/):
#   sh tools/ecosystem_check.sh OUT_DIR PHASES
# PHASES is a comma-separated subset of:
#   install       pip install of this checkout (no dependencies, no build isolation)
#   unpack        the peers from .peers/packed/ (carry .peers/packed and .peers/scripts): z3tl.tar.xz holds the
#                 z3 and TileLang wheels unzipped (folders z3/ and tl/, laid out as site-packages), sgk.tar.xz
#                 the folder sgk/; xz fits all of them into one call's 64 MiB, where the wheels take 114 MiB:
#                   (cd DIR && for w in .peers/z3/*.whl; do unzip -qo -d z3 $w; done; same for tl/; \
#                    tar -cf - z3 tl | xz -9 > z3tl.tar.xz); tar -C .peers -cf - sgk | xz -9 > sgk.tar.xz
#   peers-sgk     the kit on FlashMLA's sparse kernels and sglang's fast_topk, from sglang-kernel's
#                 compiled libraries in .peers/sgk (carry .peers/sgk)
#   z3            TileLang's z3 wheel into /tmp/site (carry .peers/z3; a call of its own: 64 MiB a call)
#   peers-tilelang  the kit on TileLang's example kernels (carry .peers/tl and .peers/scripts, after z3)
#   transformers  tools/transformers_bench.py: transformers' DeepSeek-V3.2 layers, sdpa against dsa-ref
#   decode        dsa-ref bench --cases decode_step,host on both backends, FlashMLA's decode kernel from .peers/sgk
# Every peers phase merges its adapters into OUT_DIR/peers.json (tools/peers_check.py --merge): copy it
# to docs/pages/results/peers.json, where the docs' peers page renders it.
set -u
OUT=$1
PHASES=${2:-install,peers-sgk}
LOG=$OUT/ecosystem_check.log
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { printf '\n===== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$LOG"; }
has() { case ",$PHASES," in *",$1,"*) return 0 ;; esac; return 1; }

if has install; then
  step "install"
  python3 -m pip install -q --no-deps --no-build-isolation . >>"$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"
fi
if has unpack; then
  step "the peers from .peers/packed"
  python3 - >>"$LOG" 2>&1 <<'PY'
import os, shutil, tarfile
os.makedirs("/tmp/site", exist_ok=True)
with tarfile.open(".peers/packed/z3tl.tar.xz") as archive:
    archive.extractall("/tmp/unpacked")
for part in ("z3", "tl"):
    shutil.copytree(f"/tmp/unpacked/{part}", "/tmp/site", dirs_exist_ok=True)
with tarfile.open(".peers/packed/sgk.tar.xz") as archive:
    archive.extractall(".peers")
print("unpacked:", sorted(os.listdir("/tmp/site"))[:20], sorted(os.listdir(".peers/sgk")))
PY
  echo "rc=$?" | tee -a "$LOG"
fi
if has peers-sgk; then
  step "FlashMLA and sglang through the kit"
  timeout 240 python3 tools/peers_check.py --profile ci --sgl-kernel-libs .peers/sgk --adapters FlashMLA,SglangTopK \
    --merge --out "$OUT/peers.json" >>"$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
fi
if has z3; then
  step "z3 for TileLang"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/z3/*.whl >>"$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
fi
if has peers-tilelang; then
  step "TileLang's example kernels through the kit"
  if ls .peers/tl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/tl/*.whl >>"$LOG" 2>&1
  fi
  # One adapter a process, each merged as it ends, so a limit reached by one keeps the others' results.
  # TileLang compiles a kernel per shape (10-20 s each): its top-k ran out of 100 s at the ci profile's
  # 30 examples on 2026-12-02, hence ${TL_EXAMPLES_PER_OP:-10} examples per op and 200 s each.
  for adapter in TileLangSparseMLA TileLangIndexer TileLangTopK; do
    PYTHONPATH=/tmp/site TL_EXAMPLES=.peers/scripts/tilelang_examples timeout 200 python3 tools/peers_check.py \
      --profile ci --max-examples "${TL_EXAMPLES_PER_OP:-10}" --adapters $adapter --merge --out "$OUT/peers.json" \
      >>"$LOG" 2>&1
    echo "$adapter rc=$?" | tee -a "$LOG"
  done
fi
if has transformers; then
  step "transformers' DeepSeek-V3.2 on dsa-ref against its sdpa path"
  timeout 400 python3 tools/transformers_bench.py --contexts 8192,16384,32768 --layers 4 \
    --out "$OUT/transformers_bench.json" >>"$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
fi
if has decode; then
  step "the decode step and the host cost"
  timeout 300 python3 -m dsa_ref bench --backend triton,cupy --cases decode_step,host --sgl-kernel-libs .peers/sgk \
    --out "$OUT/bench" 2>&1 \
    | tail -n 40 >>"$LOG"
fi
step "done"
tail -n 60 "$LOG"
