#!/usr/bin/env bash
# The prepared GPU check: honest numbers in two device calls of at most 10 minutes (600 s) each on
# one H100/H200 (torch 2.11, triton 3.6, Python 3.12, no network, diffusers carried as a wheel).
# The first call (the default, `--part 1`) checks the engine on DiT-XL/2 and SDXL and runs the GPU
# tests; it runs first, since it has never run. The second (`--part 2`) times the newer families
# (PixArt-Sigma 1024 px) and fits the rest of a 15-minute session only on a warm machine whose build
# is kept; otherwise it is the next session's call.
#
# Part 1 -- stages, in order, each under a wall-clock guard and each leaving its own file in $OUT as soon
# as it finishes, so a timeout still returns everything done before it. A failing stage does not
# stop the next ones (a failed build still runs the Triton / torch paths).
#
#   stage     guard  expected on H200  files (the device tool returns at most 8)
#   env         20s    ~2s             check.log (this script's log: env, stage lines, suite output)
#   build      150s    60-100s         build.log (CMake + nvcc for sm_80/sm_90, MAX_JOBS=16)
#   suite      330s    ~240s           correctness.json, kernels.json, e2e.json, e2e.png, profile.txt
#                                      (gpu_suite.py's own guards: correctness 40, kernels 75,
#                                      e2e 190, profile 25; e2e.json rewritten after every config)
#   sdxl    <=240s    ~120-180s        sdxl.json (gpu_suite.py --stages sdxl in its own process: SDXL
#                                      base U-Net per forward, eager / compile / engine dense / mosaic
#                                      0.3; its guard is what the 600 s total leaves after the tests'
#                                      100 s and a 10 s margin, at most 240 s; skipped under 60 s)
#   tests      100s    60-90s          gpu_tests.log (tests/kernels + tests/runtime on CUDA tensors,
#                                      --timeout 60 per test, no -x, pytest-xdist when present)
#   total      600s    ~8-9.5 min      (the sdxl guard keeps the sum of all stages within it)
# The suite runs before the test suite: its correctness stage checks the real path at full
# shapes first, and the tests' duration (hundreds of first-time Triton compiles) is the least
# predictable part, so it gets what is left.
#
# The SDXL prune time (OBS, 32 calibration samples per stage) takes minutes and is not part of this
# check: run `python benchmarks/gpu_suite.py --out DIR --stages sdxl --sdxl-prune-time --sdxl-guard-s 560`
# as its own device call.
#
# Part 2:
#   stage     guard  expected on H200  files
#   env         20s    ~2s             check.log
#   build      150s    60-100s         build.log (seconds when the machine is warm and built)
#   pixart  <=420s    ~150-250s        pixart.json (gpu_suite.py --stages pixart: PixArt-Sigma 1024 px
#                                      transformer per forward, eager / compile / engine dense /
#                                      mosaic 0.3, per step and step-weighted over DPM-Solver++ 20)
# Parts 3 and 4 (each its own call, as part 2): env, build, then
#   flux    <=420s    ~200-300s        flux.json (FLUX.1-dev 1024 px transformer, bf16, batch 1,
#                                      flow-matching Euler 28 steps; each engine config freed once timed)
#   sd3     <=420s    ~150-250s        sd3.json (SD3.5-Large 1024 px transformer, bf16, batch 2 = CFG,
#                                      flow-matching Euler 28 steps, shift 3)
# Part 5 (its own call, as part 2; issue 23 item 5), env, build, then
#   stacked <=420s    ~200-350s (est.) stacked.json (gpu_suite.py --stages stacked: DiT-XL/2, random bf16
#                                      weights, 256 px, forward batch 16 = 8 images with CFG, DDIM 50,
#                                      per image: (a) diffusers + torch.compile dense; (b) the same
#                                      diffusers DiT with FP8 attention/MLP linears (torch._scaled_mm,
#                                      benchmarks/fp8_linear.py: no torchao there) + regionally compiled
#                                      blocks + diffusers' first-block cache (threshold 0.1); (c) mosaic
#                                      0.5 + mosaicdiff.quantize(fp8) + enable_cache(FirstBlockCacheConfig
#                                      (0.1)); then engine dense + FP8 + cache and the per-token FP8
#                                      mosaic. Targets: (a)/(c) >= 4x and (b)/(c) >= 1.5x in ms per image.
#                                      Also compile time per stage (first pass less a steady one), dynamo
#                                      graphs, block evaluations per image (count_block_evaluations). A
#                                      card below cc 8.9 (or the CPU rehearsal) runs the FP8 torch
#                                      fallbacks and says so: no FP8 speed then.)
# Part 6 (its own call, as part 2; issue 24 item 4), env, build, then
#   kstages <=420s    ~60-150s (est.)  kstages.json (gpu_suite.py --stages kstages: DiT-XL/2, random bf16
#                                      weights, 256 px, forward batch 16 = 8 images with CFG, DDIM 50:
#                                      the three-stage mosaic against a ten-stage stepwise one (sparsities
#                                      from the stepwise allocation of a fixed sensitivity curve, no
#                                      calibration) at mean sparsity 0.3 and 0.5; per mosaic: ms per image
#                                      with CUDA graphs on and off, distinct stage shapes, autotune
#                                      seconds (fresh config cache), graph memory per stage, peak reserved)
#
# Exit status: a bitmask of failed stages: build 1, correctness 2, kernels 4, e2e 8, profile 16,
# tests 32, sdxl 64, pixart 128, flux 256, sd3 512, stacked 1024, kstages 2048 (failed, timed out or
# skipped for lack of time; 0 = everything passed). check.log has one "stage NAME: ok|failed|timeout" line each.
#
# Before the device call, on the dev machine: bash benchmarks/prepare_gpu_run.sh (wheels into .whl/)
# Then run with carry [".whl"] and timeout_s 600 (leaves room for one rerun in a 15-minute lease):
#   MOSAIC_COMMIT=<short sha> bash benchmarks/gpu_check.sh            # part 1
#   MOSAIC_COMMIT=<short sha> bash benchmarks/gpu_check.sh --part 2   # part 2 (OUT=... another folder)
#   ... --part 3 (flux), --part 4 (sd3): one call each, in later sessions
#   MOSAIC_COMMIT=<short sha> bash benchmarks/gpu_check.sh --part 5   # the stacked benchmark (one call)
#   MOSAIC_COMMIT=<short sha> bash benchmarks/gpu_check.sh --part 6   # K stages against three (one call)
# Results land in $OUT (the device tool's folder), else benchmarks/results/<date>-<card>/.
#
# Rehearsal on a CPU (same suite code paths, tiny model, no build unless MOSAIC_CHECK_BUILD=1;
# MOSAIC_CHECK_SUITE_STAGES=a,b runs a subset of the suite's stages, sdxl included):
#   bash benchmarks/gpu_check.sh --dry-run            # results in $OUT or a fresh temp folder
#   bash benchmarks/gpu_check.sh --dry-run --part 2
#   bash benchmarks/gpu_check.sh --dry-run --part 5   # tiny DiT; FP8 on the torch fallbacks (no FP8 speed)
#   bash benchmarks/gpu_check.sh --dry-run --part 6   # tiny DiT; no CUDA graphs, no tuning on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 PART=1
CHECK_START=$(date +%s)
TOTAL_S=600 TESTS_GUARD_S=100
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --part) shift; PART="${1:-}" ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --part 1|2|3|4|5|6)" >&2; exit 2 ;;
  esac
  shift
done
case "$PART" in 1|2|3|4|5|6) ;; *) echo "gpu_check.sh: --part must be 1, 2, 3, 4, 5 or 6, got '$PART'" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1 MOSAIC_COMMIT="${MOSAIC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
PY="${PYTHON:-python3}"

if [ -z "${OUT:-}" ]; then
  if [ "$DRY" = 1 ]; then OUT=$(mktemp -d); else OUT="benchmarks/results/$(date +%F)-gpu-part$PART"; fi
fi
mkdir -p "$OUT"
LOG="$OUT/check.log"
: > "$LOG"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
failed=0
# run_stage NAME BIT GUARD_S CMD...: run CMD under a wall-clock guard, log its status line.
run_stage() {
  local name=$1 bit=$2 guard=$3 start rc status
  shift 3
  start=$(date +%s)
  say "stage $name: start (guard ${guard} s)"
  timeout --kill-after=10 "$guard" "$@"
  rc=$?
  if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
  [ $rc -ne 0 ] && failed=$(( failed | bit ))
  say "stage $name: $status (rc $rc, $(( $(date +%s) - start )) s)"
  return $rc
}

# env: wheels, paths, card and versions.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || say "wheel install failed"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# (The CPU rehearsal runs the torch backends: the interpreter would triple its time, and the CPU
# test suite already runs every Triton launcher through it.)
say "commit $MOSAIC_COMMIT, out $OUT, dry run $DRY, part $PART"
if [ "$DRY" = 0 ]; then
  timeout 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
    --format=csv 2>&1 | tee -a "$LOG"
fi
timeout 60 "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tee -a "$LOG"

# build: the extension against the machine's torch (no build isolation: no network there).
if [ "$DRY" = 0 ] || [ "${MOSAIC_CHECK_BUILD:-0}" = 1 ]; then
  run_stage build 1 150 env MOSAIC_BUILD_EXT=1 MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log" | tee -a "$LOG"
  "$PY" -c "from mosaic_kernels._ext import load_extension; m, r = load_extension(); \
print('mosaic_kernels._C:', 'loaded' if m else f'not loaded ({r})')" 2>&1 | tee -a "$LOG"
else
  say "stage build: skipped (dry run; set MOSAIC_CHECK_BUILD=1 to build)"
fi

# parts 2-6: one stage each (pixart, flux, sd3: a newer family's forward; stacked: DiT-XL/2 with
# FP8 + cache; kstages: DiT-XL/2 mosaics of three and ten stages), in its own process, with what the
# total leaves.
if [ "$PART" != 1 ]; then
  case "$PART" in 2) family=pixart bit=128 ;; 3) family=flux bit=256 ;; 4) family=sd3 bit=512 ;;
    5) family=stacked bit=1024 ;; 6) family=kstages bit=2048 ;; esac
  family_args=(--out "$OUT" --stages "$family")
  if [ "$DRY" = 1 ]; then
    family_guard=300  # tiny model: seconds on 2 shared cores
    family_args+=(--dry-run)
  else
    family_guard=$(( TOTAL_S - ($(date +%s) - CHECK_START) - 10 ))
    [ "$family_guard" -gt 420 ] && family_guard=420
    family_args+=("--$family-guard-s" $(( family_guard - 15 )))  # its own guard first: the json is complete
  fi
  run_stage "$family" "$bit" "$family_guard" "$PY" benchmarks/gpu_suite.py "${family_args[@]}" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -ne 0 ] && failed=$(( failed | bit ))
  say "done: exit status $failed (bits: build 1, $family $bit)"
  ls -l "$OUT" | tee -a "$LOG"
  exit $failed
fi

# suite: correctness, kernels, e2e, profile (its exit status is its own bitmask, shifted here).
stage_list="${MOSAIC_CHECK_SUITE_STAGES:-correctness,kernels,e2e,profile,sdxl}"
suite_stages=$(tr ',' '\n' <<< "$stage_list" | grep -vx sdxl | paste -sd, -)
suite_args=(--out "$OUT" --stages "$suite_stages")
[ "$DRY" = 1 ] && suite_args+=(--dry-run)
suite_guard=330
[ "$DRY" = 1 ] && suite_guard=1320  # gpu_suite.py scales its own guards by 4 in a dry run
run_stage suite 0 "$suite_guard" "$PY" benchmarks/gpu_suite.py "${suite_args[@]}" 2>&1 | tee -a "$LOG"
suite_rc=${PIPESTATUS[0]}
bit=2
for s in correctness kernels e2e profile; do  # a stage without its ok line failed or never ran
  grep -q "stage $s: ok" "$LOG" || failed=$(( failed | bit ))
  bit=$(( bit * 2 ))
done
[ "$suite_rc" -ne 0 ] && [ "$suite_rc" -lt 16 ] && failed=$(( failed | (suite_rc << 1) ))

# sdxl: its own process (the DiT models' memory is freed), with what the total leaves.
if [[ ",$stage_list," == *",sdxl,"* ]]; then
  sdxl_args=(--out "$OUT" --stages sdxl)
  if [ "$DRY" = 1 ]; then
    sdxl_guard=300  # tiny model: ~10-20 s on 2 shared cores
    sdxl_args+=(--dry-run)
  else
    sdxl_guard=$(( TOTAL_S - ($(date +%s) - CHECK_START) - TESTS_GUARD_S - 10 ))
    [ "$sdxl_guard" -gt 240 ] && sdxl_guard=240
    sdxl_args+=(--sdxl-guard-s $(( sdxl_guard - 15 )))  # its own guard first: sdxl.json is complete
  fi
  if [ "$sdxl_guard" -lt 60 ]; then
    say "stage sdxl: skipped (${sdxl_guard} s left of the ${TOTAL_S} s total)"
    failed=$(( failed | 64 ))
  else
    run_stage sdxl 0 "$sdxl_guard" "$PY" benchmarks/gpu_suite.py "${sdxl_args[@]}" 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -ne 0 ] && failed=$(( failed | 64 ))
  fi
fi

# tests: kernels and runtime on CUDA tensors (a dry run runs the dispatch and graph tests only).
tests=(tests/kernels tests/runtime)
[ "$DRY" = 1 ] && tests=(tests/kernels/test_dispatch.py tests/runtime/test_graphs.py)
xdist=()
"$PY" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && xdist=(-n 8)
run_stage tests 32 "$TESTS_GUARD_S" "$PY" -m pytest -q -p no:cacheprovider --timeout 60 "${xdist[@]}" "${tests[@]}" \
  > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$LOG"

say "done: exit status $failed (bits: build 1, correctness 2, kernels 4, e2e 8, profile 16, tests 32, sdxl 64)"
ls -l "$OUT" | tee -a "$LOG"
exit $failed
