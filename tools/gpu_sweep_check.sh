#!/usr/bin/env bash
# On a lent GPU machine (after tools/stage_gpu_carry.sh here, as for gpu_check.sh): stacked sweeps on CUDA.
# Extracts FER2013 with a random-init ViT-B/16 (512-d features, as CLIP's; weights do not change the speed), runs
# the CUDA stacking tests, then `bench sweep` for linear (32 points) and mask at its published 60-epoch recipe
# (8 points), with a GPU utilisation trace. Every output goes to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
DEVICE=${DEVICE:-cuda}; SLOW=${SLOW:-1}
step() {  # step NAME LIMIT CMD...
  local name=$1 limit=$(($2 * SLOW)) t=$SECONDS; shift 2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "$name: rc ${PIPESTATUS[0]} in $((SECONDS - t)) s" | tee -a "$OUT/steps.txt"
}
S=/tmp/fer2013-vitb16.zarr
step extract 120 $PY -m fercache -q extract data_manifests/fer2013.csv.gz --data-root "$DATA" \
  --encoder open_clip:ViT-B-16 --pretrained none --device "$DEVICE" --out $S
step pytest-stacks 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k stacks
command -v nvidia-smi >/dev/null && { nvidia-smi dmon -s um -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!; }
step bench-sweep-linear 120 $PY -m fercache bench sweep $S --head linear --device "$DEVICE"
step bench-sweep-mask 420 $PY -m fercache bench sweep $S --head mask --device "$DEVICE" \
  --axis n_drop=2,4,7,10 --axis w_sep=1.0,1.5
[ -n "${DMON:-}" ] && kill "$DMON"
