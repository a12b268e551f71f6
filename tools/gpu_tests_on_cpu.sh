#!/usr/bin/env bash
# The CUDA tests (tests/test_gpu.py) run on CPU with every "cuda" swapped for "cpu": not a GPU check, but it
# catches what breaks in those code paths before a GPU session spends its minutes on it (it found bf16
# extraction, the CUDA default, crashing in torch.cat under autocast). Expect one failure: the test that reads
# CUDA memory (f_peak_device_mib is None on CPU).
#   bash tools/gpu_tests_on_cpu.sh            (uses .venv/bin/python; PY=... to change)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=tests/test_zz_gpu_on_cpu.py
trap 'rm -f "$tmp"' EXIT
sed -e 's/"cuda"/"cpu"/g; s/\.pin_memory()//g' \
    -e 's/pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")/pytest.mark.gpu/' tests/test_gpu.py > "$tmp"
$PY -m pytest -q -m gpu -p no:cacheprovider "$tmp" "$@"
