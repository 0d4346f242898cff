#!/bin/sh
# Runs tools/triton_gpu_run.py on a lent GPU machine from a copy of the repository (no install needed):
# backends/ is exposed as dsa_ref_backends, and a minimal dist-info registers the entry points
# (the backends and the pytest plugin) that an install would.
#   sh tools/triton_gpu_session.sh OUT_DIR [triton_gpu_run.py arguments...]
set -e
OUT_DIR=$1; shift
SITE=/tmp/dsa_ref_site
mkdir -p $SITE/dsa_ref-0.1.0.dist-info
ln -sfn "$PWD/backends" $SITE/dsa_ref_backends
printf 'Metadata-Version: 2.1\nName: dsa-ref\nVersion: 0.1.0\n' > $SITE/dsa_ref-0.1.0.dist-info/METADATA
printf '[dsa_ref.backends]\nnumpy = dsa_ref_backends.numpy_reference:NumpyBackend\ntriton = dsa_ref_backends.torch_triton:TritonBackend\n\n[pytest11]\ndsa_ref = dsa_ref.testing.pytest_plugin\n' \
  > $SITE/dsa_ref-0.1.0.dist-info/entry_points.txt
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1
python3 tools/triton_gpu_run.py --out "$OUT_DIR" "$@"
