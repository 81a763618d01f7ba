#!/usr/bin/env bash
# Prepare the device call of benchmarks/gpu_check.sh, on the dev machine: the GPU machine has no
# network and no diffusers, so its pure-Python wheels travel in .whl/ (git-ignored; name ".whl"
# in the device tool's carry). Everything else the check needs is on that machine's image.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl diffusers==0.42.1 importlib_metadata
ls -l .whl
echo "now: device run with carry [\".whl\"], timeout_s 600:"
echo "  MOSAIC_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh            # first"
echo "  MOSAIC_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh --part 2   # second (next session if no time)"
