# Sourced by the GPU scripts: install the carried wheels (tools/stage_gpu_carry.sh) and unpack FER2013.
# Sets PY, DATA and OUT; SKIP_WHEELS=1 uses the Python environment as it is (a dry run on CPU).
OUT=${OUT:-/tmp/fercache-gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
DATA=${DATA:-/tmp/data}
[ -d "$DATA/fer2013" ] || { mkdir -p "$DATA" && tar -C "$DATA" -xzf .gpudata/fer2013.tar.gz; } || exit 1
export PYTHONUNBUFFERED=1
