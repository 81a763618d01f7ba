"""Where along the trajectory is an embedded model fragile? Prune one window of the steps at a time.

Issue 24, item 1, the premise test: the sampler's steps are cut into `--windows` windows of equal
step counts (DDIM-50 and 10 windows: 5 steps each); for each window, a mosaic prunes only that
window's steps at `--sparsity` (structured OBS on calibration inputs of the window's own timesteps,
as a MosaicDiff stage) and keeps every other step dense. Each mosaic samples the demo's images
(same noise and labels) and is measured against the dense model's: the PSNR and SSIM loss with 95%
bootstrap intervals, class accuracy and FID. Beside each window: the closed-form learning-speed
score's mean over the window (`mosaicdiff.method.schedule.normalized_score`), so the report says
whether the loss follows it.

The report is rewritten atomically after every window (an interrupted run keeps what finished):

    OMP_NUM_THREADS=1 python scripts/stage_sensitivity.py --model digits-dit --out docs/data/stage_sensitivity_dit.json
    OMP_NUM_THREADS=1 python scripts/stage_sensitivity.py --model digits-unet --out docs/data/stage_sensitivity_unet.json
"""

from __future__ import annotations

import argparse
import time

from mosaicdiff.app.subjects import SUBJECTS
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.core.schedulers import noise_process
from mosaicdiff.eval import measure
from mosaicdiff.families import family_for
from mosaicdiff.method import schedule, step_allocation
from mosaicdiff.search.cache import StagePruneCache

from _digits_run import prepare_run_from_args, run_options


def step_windows(timesteps, num_windows: int, timestep_end: int) -> list[tuple[str, int, int]]:
    """`num_windows` stages ``(name, t_start, t_end)`` holding equal numbers of the sampler's steps,
    tiling ``[0, timestep_end)`` high t first (`mosaicdiff.method.step_allocation.equal_step_stages`,
    named ``"w0"`` ...)."""
    try:
        stages = step_allocation.equal_step_stages(timesteps, num_windows, timestep_end)
    except ValueError as exc:
        raise ValueError(f"--windows: {exc}") from None
    return [(f"w{k}", t0, t1) for k, (_, t0, t1) in enumerate(stages)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                parents=[run_options(num_samples=200, models=sorted(SUBJECTS))])
    p.add_argument("--windows", type=int, default=10, help="windows of equal step counts")
    p.add_argument("--sparsity", type=float, default=0.6, help="the sparsity of the pruned window")
    args = p.parse_args(argv)
    run = prepare_run_from_args(args)
    subject = run.subject
    process = noise_process(run.scheduler)
    windows = step_windows(run.scheduler.timesteps, args.windows, process.timestep_end)
    g = subject.guidance_scale
    dense_images, _ = run.sample(run.dense, g)
    score = schedule.normalized_score(process, run.log_snr_weight, run.calibration.x0_sq_norm)
    cache = StagePruneCache(run.dense, run.calibration, windows, samples_per_stage=args.samples_per_stage,
                            seed=args.seed, align=subject.align, alphas_cumprod=process)
    family = family_for(run.dense)
    report = {"model": args.model, "sparsity": args.sparsity, "steps": args.steps, "num_samples": args.num_samples,
              "guidance_scale": g, "sampler": subject.sampler, "samples_per_stage": args.samples_per_stage,
              "seed": args.seed, "closed_form_boundaries": list(run.boundaries),
              "dense": measure.measure(dense_images, run.labels, None, run.per_seed).summary(), "windows": []}
    started = time.perf_counter()
    for k, (name, t0, t1) in enumerate(windows):
        specs = [cache.stage_spec(i, args.sparsity if i == k else 0.0) for i in range(len(windows))]
        mosaic = family.mosaic_class.from_dense(run.dense, specs, share_producers=False)
        images, _ = run.sample(mosaic, g)
        summary = measure.measure(images, run.labels, dense_images, run.per_seed).summary()
        steps = [int(t) for t in run.scheduler.timesteps.tolist() if t0 <= t < t1]
        report["windows"].append({"name": name, "t_start": t0, "t_end": t1, "steps": len(steps),
                                  "closed_form_score": float(score[t0:min(t1, len(score))].mean()),
                                  "widths": cache.widths(k, args.sparsity), **summary})
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["cache"] = cache.stats()
        write_json_atomic(args.out, json_safe(report))
        iv = summary["intervals"]["psnr_to_dense"]
        print(f"{name} [{t0:4d}, {t1:4d}) {len(steps)} steps: PSNR {summary['psnr_to_dense']:.2f} "
              f"[{iv['low']:.2f}, {iv['high']:.2f}], SSIM {summary['ssim_to_dense']:.4f}, "
              f"acc {summary['class_accuracy']:.3f}, FID {summary['fid']:.1f}, score {report['windows'][-1]['closed_form_score']:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
