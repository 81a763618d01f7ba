#!/usr/bin/env bash
# The one prepared GPU check: build _C, check every kernel backend against the torch reference
# on CUDA tensors, then run the benchmark suite. Made for the lent H100/H200 machine (torch
# 2.11, triton 3.6, Python 3.12, no network, no diffusers).
#
# Before the call, on the dev machine (diffusers is pure Python; its deps are on the GPU image):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# Then run it with carry [".whl"] and a timeout that leaves room for a rerun:
#   MOSAIC_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# Results land in $OUT (the device tool's folder) or benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export MOSAIC_COMMIT="${MOSAIC_COMMIT:-unknown}" PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

# 1. Build the extension against the machine's torch (no build isolation: no network there).
start=$(date +%s)
MOSAIC_BUILD_EXT=1 MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "extension build: $(( $(date +%s) - start )) s"

# 2. Correctness on CUDA tensors: kernels (cuda, triton, vendor paths) and the runtime (graphs).
python3 -m pytest -q -x tests/kernels tests/runtime -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/gpu_tests.log"

# 3. Timing: kernels at DiT-XL/2 shapes and the end-to-end configs, side by side.
python3 benchmarks/gpu_suite.py --out "$OUT" 2>&1 | tee "$OUT/suite.log" | tail -20
exit $tests_rc
