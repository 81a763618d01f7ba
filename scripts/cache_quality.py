"""Caching on top of pruning: images per compute and quality to dense, for cache, mosaic and both.

Issue 23, item 2. The embedded digits DiT, DDIM-50 at the demo's guidance. Every variant samples
the same noise and labels in batches of `--batch` images (a cache decides per batch, and its state
is reset after each batch, as a diffusers pipeline resets it after each call); its compact block
forwards are counted (`mosaicdiff.core.block_cache.count_block_evaluations`: a block the cache
skips or predicts is not counted) and its images are measured against the dense model's (PSNR and
SSIM with 95% bootstrap intervals, `mosaicdiff.eval.measure`).

Variants: the engine dense model (the sparsity-0 mosaic: the mosaic's kernels, every block), the
mosaic at `--sparsity`, each alone, with diffusers' first-block cache and with TaylorSeer. Compute
per image: block evaluations (a CFG image is two rows through each block it runs) and dense-block
equivalents (each evaluation weighted by its block's weights over a dense block's). "Multiply"
compares the measured gain of mosaic + cache with the product of the two gains alone.

The report is rewritten atomically after every variant (an interrupted run keeps what finished):

    OMP_NUM_THREADS=1 python scripts/cache_quality.py --out docs/data/cache_quality_dit.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from mosaicdiff.app import experiment
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.core.block_cache import count_block_evaluations
from mosaicdiff.eval import measure
from mosaicdiff.families.dit.model import MosaicDiT

from _digits_run import prepare_run_from_args, run_options


def sample_counted(run, model, config, batch: int, guidance_scale: float):
    """`model`'s images of the run's noise and labels (with cache `config`, or none) and the
    `BlockEvaluations` of the whole run."""
    if config is not None:
        model.enable_cache(config)
    images = []
    try:
        with count_block_evaluations(model) as counts:
            for i in range(0, len(run.labels), batch):
                with model.cache_context("cond") if config is not None else contextlib.nullcontext():
                    images.append(run.subject.sample(model, run.labels[i:i + batch], run.noise[i:i + batch],
                                                     steps=run.steps, guidance_scale=guidance_scale, progress=False))
                if config is not None:
                    model.reset_cache()  # the next batch is a new run
    finally:
        if config is not None:
            model.disable_cache()
    return torch.cat(images), counts


def compute_entry(counts, images: int, dense_block_weights: float) -> dict:
    return {"block_evals_per_image": counts.total_rows / images,
            "dense_block_equivalents_per_image": counts.total_weights / dense_block_weights / images,
            "block_forwards_per_stage": list(counts.blocks)}


def multiplication(variants: dict, cache: str) -> dict | None:
    """Gains in images per compute (dense-block equivalents) of mosaic, cache and both, against dense."""
    names = ("dense", f"dense+{cache}", "mosaic", f"mosaic+{cache}")
    if not all(n in variants for n in names):
        return None
    cost = [variants[n]["dense_block_equivalents_per_image"] for n in names]
    gain_cache, gain_mosaic, gain_both = cost[0] / cost[1], cost[0] / cost[2], cost[0] / cost[3]
    return {"gain_cache_alone": gain_cache, "gain_mosaic_alone": gain_mosaic, "gain_both": gain_both,
            "gain_if_multiplied": gain_cache * gain_mosaic, "both_over_product": gain_both / (gain_cache * gain_mosaic),
            "cache_gain_on_mosaic": cost[2] / cost[3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[
        run_options(num_samples=100, out=Path("docs/data/cache_quality_dit.json"), num_seeds=True)])
    p.add_argument("--sparsity", type=float, default=0.3, help="the mosaic's target sparsity")
    p.add_argument("--threshold", type=float, default=0.1, help="the first-block cache's threshold")
    p.add_argument("--taylor-interval", type=int, default=3, help="TaylorSeer: one computed step every N")
    p.add_argument("--taylor-warmup", type=int, default=3, help="TaylorSeer: computed steps first (per stage)")
    p.add_argument("--no-taylorseer", action="store_true", help="skip the TaylorSeer variants")
    p.add_argument("--batch", type=int, default=10, help="images per sampling run (what the cache decides on)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.num_samples % args.batch:
        raise SystemExit(f"--batch must be >= 1 and divide --num-samples ({args.num_samples}), got {args.batch}")
    run = prepare_run_from_args(args)
    subject = run.subject
    g, n = subject.guidance_scale, len(run.labels)
    caches = {"fbc": FirstBlockCacheConfig(threshold=args.threshold)}
    if not args.no_taylorseer:
        caches["taylorseer"] = TaylorSeerCacheConfig(cache_interval=args.taylor_interval,
                                                     disable_cache_before_step=args.taylor_warmup,
                                                     taylor_factors_dtype=torch.float32)
    started = time.perf_counter()
    dense_images, _ = run.sample(run.dense, g)
    mosaic, _ = run.prune("mosaic", args.sparsity)
    models = {"dense": MosaicDiT.from_dense_unpruned(run.dense), "mosaic": mosaic}
    report = {"model": subject.name, "sampler": subject.sampler, "steps": args.steps, "guidance_scale": g,
              "num_samples": args.num_samples, "seeds": list(run.seeds), "batch": args.batch,
              "sparsity": args.sparsity, "stages": experiment.stage_info(mosaic),
              "caches": {k: repr(c) for k, c in caches.items()},
              "reference": "diffusers' DiTTransformer2DModel, no cache", "variants": {}}
    dense_block_weights = None
    for model_name, model in models.items():
        for cache_name, config in [(None, None), *caches.items()]:
            name = model_name if cache_name is None else f"{model_name}+{cache_name}"
            images, counts = sample_counted(run, model, config, args.batch, g)
            if dense_block_weights is None:  # the first variant: the dense model without cache
                dense_block_weights = counts.total_weights / counts.total_rows
            summary = measure.measure(images, run.labels, dense_images, run.per_seed).summary()
            report["variants"][name] = {**compute_entry(counts, n, dense_block_weights), **summary}
            report["multiply"] = {c: multiplication(report["variants"], c) for c in caches}
            report["seconds"] = round(time.perf_counter() - started, 1)
            write_json_atomic(args.out, json_safe(report))
            v, iv = report["variants"][name], summary["intervals"]["psnr_to_dense"]
            print(f"{name:18s} {v['block_evals_per_image']:7.1f} block evals/image, "
                  f"{v['dense_block_equivalents_per_image']:7.1f} dense-block eq., PSNR {summary['psnr_to_dense']:.2f} "
                  f"[{iv['low']:.2f}, {iv['high']:.2f}], SSIM {summary['ssim_to_dense']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
