#!/usr/bin/env bash
# Stage, in git-ignored folders, what a GPU run of tools/gpu_check.sh needs and the GPU image lacks:
#   .whl/       wheels for the device's Python (default 3.12): zarr and open_clip with their missing deps
#   .gpudata/   ../shared/data/fer2013 as one tar (the device carries at most 64 MiB: ~12 + ~40 MiB)
# Then call the device tool with carry [".whl", ".gpudata"] and the command `bash tools/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DATA=${SHARED_DATA:-../shared/data}
mkdir -p .git/info .whl .gpudata
for p in /.whl/ /.gpudata/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
# The device image has torch, torchvision, timm, typer, h5py, tqdm, matplotlib, pyyaml, regex, huggingface-hub and
# safetensors (see /work/.library/device/KINDS.md); these are what fercache needs beyond them.
for pkg in zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg" 2>&1 | grep -v "is ignored" || true
done
tar -C "$DATA" -czf .gpudata/fer2013.tar.gz fer2013
du -sh .whl .gpudata
