"""GPU suite: the engine against diffusers eager and torch.compile, side by side in one run.

Stages, in order, each under its own wall-clock guard and each writing its own file into
``--out`` as soon as it finishes (so a timeout still leaves everything done before it):

1. ``correctness`` -> correctness.json: the real path at DiT-XL/2 shapes before any timing.
   `MosaicDiT` at sparsity 0 (auto backends, CUDA graphs) against diffusers'
   ``DiTTransformer2DModel`` in fp32, next to diffusers' own bf16 error; the 0.5 mosaic per
   stage against the same stage run on the torch reference in fp32. Bound: the engine's relative
   error may be at most ``max(2 x the bf16 baseline's, 1e-2)``. Records which backend ran each
   op and how many CUDA graphs were captured or failed.
2. ``kernels`` -> kernels.json: first the SDPA kernel of every stage's attention shape is
   measured and persisted in the `mosaic_kernels.configs` cache (``tuned_configs``), so the e2e
   stage runs the winners; then every provider of every op at the shapes the 0.3 and 0.5
   mosaics really run (`bench_kernels.stage_cases`: each op's registered benchmark case),
   validated against the reference first.
3. ``e2e`` -> e2e.json (rewritten after every config) and e2e.png: per forward (stages weighted
   by their DDIM-50 step counts) and per DDIM-50 + CFG sampling run, at forward batch 16 and
   64: diffusers_eager_dense, engine_dense, engine_mosaic_0.5, engine_mosaic_0.3,
   diffusers_compile_dense (``dynamic=False``: compiled once per batch, counted),
   compile_pruned_0.5 (``mode="reduce-overhead"`` of the same compact mosaic with plain bf16
   torch ops, F.linear + tanh-GELU: both sides have CUDA graphs; compiled once per stage and
   batch, batch 16 only unless time remains) and engine_dense_unfused (block-boundary fusion off,
   batch 16). Ratios and the issue's targets are recomputed after every config.
4. ``profile`` -> profile.txt: torch.profiler tables (top kernels by GPU time) of engine_dense
   and diffusers_compile_dense at batch 16.
5. ``sdxl`` -> sdxl.json: one SDXL base U-Net forward (bf16, 1024 px, batch 2 = CFG) per config:
   diffusers eager, diffusers + torch.compile, engine dense (`MosaicUNet` at sparsity 0) and the
   0.3 mosaic, at each mosaic stage's timestep and step-weighted over Euler-50, with the ratios
   and target PF8 (mosaic >= 1.4x compile-dense); ``--sdxl-prune-time`` adds the wall time of
   OBS pruning with 32 calibration samples per stage (minutes: not in gpu_check.sh's default).
   gpu_check.sh runs it in its own process, with what its 600 s total leaves (see there).
6. ``pixart`` -> pixart.json: one PixArt-Sigma 1024 px transformer forward (bf16, 4096 image
   tokens, 300 T5 tokens, batch 2 = CFG) per config, as sdxl: diffusers eager, diffusers +
   compile, engine dense and mosaic 0.3, per step at each stage's timestep and step-weighted
   over DPM-Solver++ 20 steps, with the target (mosaic >= 1.4x compile-dense). gpu_check.sh runs
   it in its second call (``--part 2``): the first call's stages fill its 600 s.
7. ``flux`` -> flux.json: one FLUX.1-dev 1024 px transformer forward (bf16, 4096 image + 512 text
   tokens, batch 1: guidance-distilled) per config, as pixart, over FluxPipeline's flow-matching
   Euler 28 steps (``--part 3``).
8. ``sd3`` -> sd3.json: one SD3.5-Large 1024 px transformer forward (bf16, 4096 image + 333 text
   tokens, batch 2 = CFG) per config, as pixart, over flow-matching Euler 28 steps, shift 3
   (``--part 4``).
9. ``stacked`` -> stacked.json: DiT-XL/2 per image (forward batch 16 = 8 images with CFG, DDIM 50)
   with what users already stack: diffusers + compile dense, the same diffusers DiT with FP8
   linears + regional compile + diffusers' first-block cache, and mosaic 0.5 + FP8 + first-block
   cache (the engine dense model with FP8 + cache, and the per-token FP8 mosaic, if time remains);
   compile time per stage, block evaluations per image, targets 4x and 1.5x (``--part 5``).
10. ``kstages`` -> kstages.json: the runtime cost of K stages on DiT-XL/2 (batch 16, DDIM 50 with
    CFG): the three-stage mosaic against a ten-stage stepwise one at the same mean sparsity (0.3
    and 0.5), per image with CUDA graphs on and off, distinct stage shapes, autotune seconds and
    graph memory per stage (``--part 6``).

This file is the runner and stages 1, 2 and 4. Stage 3 lives in suite_e2e.py, stages 5 to 10 in
suite_sdxl.py, suite_pixart.py, suite_flux.py, suite_sd3.py, suite_stacked.py and suite_kstages.py (the first four's
shared body, one forward per config, in suite_forward.py; the stacked stage's FP8 linears for
diffusers in fp8_linear.py), the run's models and inputs (`Suite`) in suite_context.py, the helpers the stages share (guard,
results files, run header, timing with `triton.testing.do_bench`, step weights, dynamo graph
count) in suite_common.py, the model configs in dit_models.py, sdxl_config.py and
pixart_config.py. The stages import those (suite_sdxl and suite_pixart also suite_forward),
never this file or each other.

The exit status is a bitmask of failed stages (correctness 1, kernels 2, e2e 4, profile 8,
sdxl 16, pixart 32, flux 64, sd3 128, stacked 256, kstages 512); each stage also prints ``stage NAME: ok|failed|timeout (S s)``.

    python benchmarks/gpu_suite.py --out DIR              # one H100/H200: stages 1-5
    python benchmarks/gpu_suite.py --out DIR --stages sdxl  # at most 225 s (--sdxl-guard-s)
    python benchmarks/gpu_suite.py --out DIR --stages pixart  # at most 300 s (--pixart-guard-s)
    python benchmarks/gpu_suite.py --out DIR --stages flux    # at most 400 s (--flux-guard-s)
    python benchmarks/gpu_suite.py --out DIR --stages sd3     # at most 400 s (--sd3-guard-s)
    python benchmarks/gpu_suite.py --out DIR --stages stacked # at most 420 s (--stacked-guard-s)
    python benchmarks/gpu_suite.py --out DIR --stages kstages # at most 420 s (--kstages-guard-s)
    python benchmarks/gpu_suite.py --out DIR --dry-run    # tiny model on the CPU, same code paths
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from mosaicdiff.core.atomic_io import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_common import (  # noqa: E402,F401 - StageTimeout: the tests read it
    StageTimeout,
    is_timeout,
    log,
    rel_err,
    wall_clock_guard,
    write_json,
)
from suite_context import Suite  # noqa: E402
from suite_e2e import TARGETS, e2e_plan, stage_e2e  # noqa: E402,F401 - TARGETS, e2e_plan: the dry-run tests read them
from suite_flux import stage_flux  # noqa: E402
from suite_kstages import stage_kstages  # noqa: E402
from suite_pixart import stage_pixart  # noqa: E402
from suite_sd3 import stage_sd3  # noqa: E402
from suite_sdxl import stage_sdxl  # noqa: E402
from suite_stacked import stage_stacked  # noqa: E402

STAGES = ("correctness", "kernels", "e2e", "profile", "sdxl", "pixart", "flux", "sd3", "stacked", "kstages")
#: What one run does unless told: pixart, flux, sd3, stacked and kstages are gpu_check.sh's later calls (600 s each).
DEFAULT_STAGES = STAGES[:5]
STAGE_BITS = {name: 1 << i for i, name in enumerate(STAGES)}
#: Wall-clock guard per stage on the GPU, seconds. The CPU dry run scales them by
#: DRY_RUN_GUARD_SCALE: inductor compiles for the CPU with a cold cache take minutes on 2 cores.
GUARDS = {"correctness": 40, "kernels": 75, "e2e": 190, "profile": 25, "sdxl": 225, "pixart": 300, "flux": 400,
          "sd3": 400, "stacked": 420, "kstages": 420}
DRY_RUN_GUARD_SCALE = 4


# ------------------------------------------------------------------------------------ stages


def stage_correctness(suite: Suite, out: Path) -> bool:
    """The real path at full shapes against diffusers / the torch reference, before any timing."""
    from mosaic_kernels import ops
    from mosaicdiff.families.dit.model import MosaicDiT

    dense, B = suite.dense(), 4
    x, y = suite.inputs(B, seed=1)
    result = {"env": suite.env, "bound": "engine rel. error <= max(2 x bf16 baseline's, 1e-2)", "checks": []}

    def check(name: str, model, t: int, ref: torch.Tensor, baseline: torch.Tensor, stage: int = 0) -> None:
        with torch.no_grad(), ops.record_dispatch() as calls:  # one eager call: which backends run
            model.forward_stage(stage, x, torch.full((B,), float(t), device=suite.device), y)
        with torch.no_grad():
            model(x, timestep=suite.timestep(model, t, B), class_labels=y)  # capture (graphs on)
            got = model(x, timestep=suite.timestep(model, t, B), class_labels=y).sample  # replay
        err, base = rel_err(got, ref), rel_err(baseline, ref)
        runner = model._graphs
        row = {"check": name, "t": t, "rel_err": err, "baseline_rel_err": base,
               "limit": max(2 * base, 1e-2), "passed": err <= max(2 * base, 1e-2),
               "dispatch": {f"{op}:{backend}": n for (op, backend), n in sorted(calls.items())},
               "graphs_captured": runner.num_graphs if runner else 0,
               "graphs_failed": {str(k): v for k, v in runner.failed.items()} if runner else {}}
        result["checks"].append(row)
        log(f"  {name:<28} t={t:<4} rel_err {err:.2e} (baseline {base:.2e}) "
            f"{'ok' if row['passed'] else 'FAILED'}; graphs {row['graphs_captured']}, "
            f"failed {len(row['graphs_failed'])}; {row['dispatch']}")
        write_json(out / "correctness.json", result)

    # 1. Sparsity 0: the engine against diffusers (fp32 reference, diffusers bf16 as baseline).
    dense32 = copy.deepcopy(dense).float()
    t = 500
    with torch.no_grad():
        t_dev = torch.full((B,), t, device=suite.device)
        ref = dense32(x.float(), timestep=t_dev, class_labels=y).sample
        base = dense(x, timestep=t_dev, class_labels=y).sample
    del dense32
    engine = MosaicDiT.from_dense_unpruned(dense).enable_cuda_graphs(suite.cuda)
    check("engine_dense_vs_diffusers", engine, t, ref, base)
    del engine
    # 2. Mosaic 0.5, every stage: auto backends + graphs against the torch reference in fp32.
    mosaic = suite.mosaic(0.5)
    mosaic32 = copy.deepcopy(mosaic).float()
    engine = copy.deepcopy(mosaic).enable_cuda_graphs(suite.cuda)
    for stage, (name, t0, t1, _) in enumerate(mosaic.stage_ranges):
        t = (t0 + t1) // 2
        t_vec = torch.full((B,), float(t), device=suite.device)
        with torch.no_grad(), ops.use_backend("torch"):
            ref = mosaic32.forward_stage(stage, x.float(), t_vec, y)
            base = mosaic.forward_stage(stage, x, t_vec, y)  # torch reference ops in bf16
        check(f"mosaic_0.5_{name}_vs_reference", engine, t, ref, base, stage=stage)
    return all(row["passed"] for row in result["checks"])


def stage_kernels(suite: Suite, out: Path) -> bool:
    import bench_kernels
    from mosaic_kernels import configs

    result = {"env": suite.env, "rows": []}
    # 1. The SDPA kernel per stage shape, measured and persisted in the config cache (e2e runs
    #    the winners). First: it takes seconds, and a guard timeout later must not lose it.
    heads, hd = suite.cfg["num_attention_heads"], suite.cfg["attention_head_dim"]
    tuned = configs.select_configs_for_shapes(
        [("attention", (b, suite.tokens, heads, hd), suite.dtype) for b in suite.batches], suite.device, tune=True)
    for target in (0.3, 0.5):
        for batch in suite.batches:
            tuned.update(suite.mosaic(target).autotune_kernels(batch, suite.tokens, suite.dtype))
    result["tuned_configs"] = tuned
    write_json(out / "kernels.json", result)
    log(f"  attention kernels per stage shape: { {k: v['sdpa_backend'] for k, v in tuned.items()} }")
    # 2. Every provider at the shapes the mosaics run (rows written after every case).
    cases = {}
    for target in (0.3, 0.5):
        for case in bench_kernels.stage_cases(suite.mosaic(target), tuple(suite.batches), suite.dtype, suite.device):
            cases.setdefault(case.label, case)
    for case in cases.values():
        result["rows"].extend(bench_kernels.bench_op(case, rep_ms=suite.args.kernel_rep_ms))
        write_json(out / "kernels.json", result)
    errors = [r for r in result["rows"] if "error" in r]
    log(f"  {len(cases)} cases, {len(result['rows'])} rows, {len(errors)} provider errors")
    return all(r.get("rel_err", 0) <= 2e-2 or r["provider"] == "cublas_linear" for r in result["rows"]
               if "error" not in r)


def stage_profile(suite: Suite, out: Path) -> bool:
    """torch.profiler's top kernels by GPU time: where the remaining time goes."""
    from torch.profiler import ProfilerActivity, profile

    batch = suite.batches[0]
    x, y = suite.inputs(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if suite.cuda else [])
    sort_keys = ("self_cuda_time_total", "self_device_time_total") if suite.cuda else ("self_cpu_time_total",)
    text = [f"# {suite.env['device']}, commit {suite.env['commit']}, batch {batch}, torch {suite.env['torch']}"]
    for name in ("engine_dense", "diffusers_compile_dense"):
        model = suite.model(name)
        tt = suite.timestep(model, 500, batch)
        with torch.no_grad():
            for _ in range(3):
                model(x, timestep=tt, class_labels=y)
            if suite.cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(5):
                    model(x, timestep=tt, class_labels=y)
                if suite.cuda:
                    torch.cuda.synchronize()
        table = None
        for key in sort_keys:
            try:
                table = prof.key_averages().table(sort_by=key, row_limit=25)
                break
            except (KeyError, AttributeError, ValueError):
                continue
        text += [f"\n## {name} (5 forwards)\n", table or "profiler table unavailable"]
        write_text_atomic(out / "profile.txt", "\n".join(text))
    return True


STAGE_FNS = {"correctness": stage_correctness, "kernels": stage_kernels, "e2e": stage_e2e, "profile": stage_profile,
             "sdxl": stage_sdxl, "pixart": stage_pixart, "flux": stage_flux, "sd3": stage_sd3,
             "stacked": stage_stacked, "kstages": stage_kstages}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results files")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: the same code paths")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma list, subset of {','.join(STAGES)} (default {','.join(DEFAULT_STAGES)})")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="forward batches (default 16 64; dry run 4 2)")
    p.add_argument("--rep-ms", type=int, default=None, help="timing window per forward measurement")
    p.add_argument("--kernel-rep-ms", type=int, default=None, help="timing window per kernel provider")
    p.add_argument("--sdxl-guard-s", type=float, default=None,
                   help=f"the sdxl stage's guard on the GPU, seconds (default {GUARDS['sdxl']})")
    for flag in ("pixart", "flux", "sd3", "stacked", "kstages"):
        p.add_argument(f"--{flag}-guard-s", type=float, default=None,
                       help=f"the {flag} stage's guard on the GPU, seconds (default {GUARDS[flag]})")
    p.add_argument("--sdxl-prune-time", action="store_true",
                   help="sdxl: also time OBS pruning of the SDXL U-Net (minutes; always on, tiny, in a dry run)")
    p.add_argument("--sdxl-prune-samples", type=int, default=32, help="sdxl: calibration samples per stage")
    args = p.parse_args(argv)
    for flag in ("sdxl", "pixart", "flux", "sd3", "stacked", "kstages"):
        guard = getattr(args, f"{flag}_guard_s")
        if guard is not None and guard <= 0:
            p.error(f"--{flag}-guard-s must be positive, got {guard}")
    if args.sdxl_prune_samples < 1:
        p.error(f"--sdxl-prune-samples must be at least 1, got {args.sdxl_prune_samples}")
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device; use --dry-run to check the code paths on the CPU")
    args.batches = args.batches or ([4, 2] if args.dry_run else [16, 64])
    args.rep_ms = args.rep_ms or (20 if args.dry_run else 200)
    args.kernel_rep_ms = args.kernel_rep_ms or (5 if args.dry_run else 50)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args)
    log(f"{suite.env['device']}, torch {suite.env['torch']}, triton {suite.env['triton']}, "
        f"commit {suite.env['commit']}, backends {json.dumps(suite.env['backends'])}")
    failed = 0
    scale = DRY_RUN_GUARD_SCALE if args.dry_run else 1
    for name in stages:
        guard = (getattr(args, f"{name}_guard_s", None) or GUARDS[name]) * scale
        log(f"stage {name}: start (guard {guard} s)")
        t0 = time.perf_counter()
        try:
            with wall_clock_guard(guard):
                ok = STAGE_FNS[name](suite, args.out)
            status = "ok" if ok else "failed"
        except Exception as exc:  # noqa: BLE001 - a crashed stage is reported; the next stage still runs
            if is_timeout(exc):
                status = "timeout"
            else:
                traceback.print_exc()
                status = "failed"
        if status != "ok":
            failed |= STAGE_BITS[name]
        log(f"stage {name}: {status} ({time.perf_counter() - t0:.0f} s)")
    return failed


if __name__ == "__main__":
    sys.exit(main())
