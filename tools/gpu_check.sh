#!/usr/bin/env bash
# On the GPU machine (after tools/stage_gpu_carry.sh here): install the carried wheels, unpack FER2013, then run
# the CUDA tests and the benchmarks of issue 4. Everything is also written to $OUT for the closing note.
#   N=150000 WORKERS=14 BS=512 bash tools/gpu_check.sh
# A dry run on CPU here: SKIP_WHEELS=1 PY=.venv/bin/python DATA=../shared/data DEVICE=cpu N=256 WORKERS=2 BS=64 HEAD_N=32 bash tools/gpu_check.sh
# Each step has its own time limit (seconds, the first argument of `step`) so that one slow or hung step
# cannot cost the others their figures: a device lease is short and every minute of it counts.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
N=${N:-150000}; MEM_SIZES=${MEM_SIZES:-10000,100000}; WORKERS=${WORKERS:-14}; BS=${BS:-512}; DEVICE=${DEVICE:-cuda}
HEAD_N=${HEAD_N:-2048}; SLOW=${SLOW:-1}  # SLOW=2 doubles every step's limit
T0=$SECONDS
step() {  # step NAME LIMIT CMD...: run CMD for at most LIMIT s, its output to the terminal and $OUT/NAME.txt
  local name=$1 limit=$(($2 * SLOW)) t=$SECONDS; shift 2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "$name: rc ${PIPESTATUS[0]} in $((SECONDS - t)) s (at $((SECONDS - T0)) s)" | tee -a "$OUT/steps.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; $PY -c "import torch, zarr, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__, 'open_clip', open_clip.__version__)"; } | tee "$OUT/machine.txt"
step pytest-gpu 100 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
M=data_manifests/fer2013.csv.gz
# GPU utilisation and memory once a second while the extract benchmark runs: is the GPU kept busy?
command -v nvidia-smi >/dev/null && { nvidia-smi dmon -s um -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!; }
step bench-extract-vitb16 300 $PY -m fercache bench extract $M --data-root "$DATA" --encoder open_clip:ViT-B-16 \
  --device "$DEVICE" --n-images "$N" --workers "$WORKERS" --batch-size "$BS"
[ -n "${DMON:-}" ] && kill "$DMON"
step bench-memory-vitb16 200 $PY -m fercache bench memory $M --data-root "$DATA" --encoder open_clip:ViT-B-16 \
  --device "$DEVICE" --sizes "$MEM_SIZES" --workers "$WORKERS" --batch-size "$BS"
step bench-head-vitb16 80 $PY -m fercache bench head $M --data-root "$DATA" --encoder open_clip:ViT-B-16 \
  --device "$DEVICE" --n-images "$HEAD_N" --batch-size 32
# Exploration: what autocast costs against bf16 weights (and torch.compile), model-only; last, as it matters least.
step model-speed 100 $PY tools/model_speed.py open_clip:ViT-B-16 "$DEVICE"
