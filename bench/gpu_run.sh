#!/usr/bin/env bash
# One GPU session's measurements (issue 13) in one command; every figure goes into $OUT (bench/gpu_run.py).
#
#   bash bench/gpu_run.sh              # on the GPU machine (about 4-5 minutes on an H100/H200)
#   bash bench/gpu_run.sh --tiny       # the same path on a CPU, a few images and one epoch (about a minute)
#
# Before (here, once): python -m bench.pack_cifar --out .gpu/cifar10-jpg.npz      (56 MB, git-ignored)
# Optional, for airbench94 beside the project (a pure-Python wheel, git-ignored .whl/):
#   python -m pip wheel --no-deps airbench==0.1.8 -w .whl
# Carry both folders (.gpu, .whl) with the working tree; nothing is installed but the carried wheels, and
# only into /tmp. Needs torch (+ numpy, Pillow, tqdm, matplotlib); not BentoML or onnxsim.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-run-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-run-site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-run-site"
  else
    echo "warning: could not install the carried wheels in .whl/; going on without them" >&2
  fi
fi
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=True OUT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
$PY -m bench.gpu_run --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
