#!/usr/bin/env bash
# On the GPU machine (after tools/stage_gpu_carry.sh here): install the carried wheels, unpack FER2013, then run
# the CUDA tests and the benchmarks of issue 4. Everything is also written to $OUT for the closing note.
#   N=100000 WORKERS=14 BS=512 bash tools/gpu_check.sh
# A dry run on CPU here: SKIP_WHEELS=1 PY=.venv/bin/python DATA=../shared/data DEVICE=cpu N=256 WORKERS=2 BS=64 HEAD_N=32 bash tools/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/fercache-gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
N=${N:-100000}; WORKERS=${WORKERS:-14}; BS=${BS:-512}; DEVICE=${DEVICE:-cuda}; HEAD_N=${HEAD_N:-2048}
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
DATA=${DATA:-/tmp/data}
[ -d "$DATA/fer2013" ] || { mkdir -p "$DATA" && tar -C "$DATA" -xzf .gpudata/fer2013.tar.gz; } || exit 1
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; $PY -c "import torch, zarr, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__, 'open_clip', open_clip.__version__)"; } | tee "$OUT/machine.txt"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt"
M=data_manifests/fer2013.csv.gz
$PY -m fercache bench extract $M --data-root "$DATA" --encoder open_clip:ViT-B-16 --device "$DEVICE" \
  --n-images "$N" --workers "$WORKERS" --batch-size "$BS" 2>&1 | tee "$OUT/bench-extract-vitb16.txt"
$PY -m fercache bench memory $M --data-root "$DATA" --encoder open_clip:ViT-B-16 --device "$DEVICE" \
  --sizes "$((N / 10)),$N" --workers "$WORKERS" --batch-size "$BS" 2>&1 | tee "$OUT/bench-memory-vitb16.txt"
$PY -m fercache bench head $M --data-root "$DATA" --encoder open_clip:ViT-B-16 --device "$DEVICE" \
  --n-images "$HEAD_N" --batch-size 32 2>&1 | tee "$OUT/bench-head-vitb16.txt"
