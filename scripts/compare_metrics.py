"""Which image metric sees what digits-FID misses: dense vs pruned digits DiT, every metric with 95% intervals.

Samples the embedded digits DiT dense and pruned (mosaic, uniform, magnitude) at each sparsity
from the same noise and labels, saves the grids, and scores every set with digits-FID, KID,
class accuracy, PSNR and SSIM to the dense sample of the same noise, the speckle rate (isolated
pixels) and the pixel-intensity W1 to the real digits (`mosaicdiff.eval.quality`,
`mosaicdiff.eval.pixel_metrics`). Intervals are percentile bootstraps over the images
(`mosaicdiff.eval.stats`); differences (mosaic - uniform, each method - dense) are paired: the same
resampled indices for both sets, which share noise and labels.

    python scripts/compare_metrics.py --out /tmp/metrics --sparsities 0.5 0.3

(16 min on a shared 2-core CPU with one thread: 7.5 min sampling, 8.5 min intervals; with
``--reuse`` only the intervals are recomputed.)

Outputs in ``--out``: ``images_<name>.pt`` (the samples; ``--reuse`` loads them instead of
sampling again), ``grid_<name>.png`` (column = digit class), ``metrics.json``, ``metrics.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mosaicdiff.core.atomic_io import write_json_atomic, write_text_atomic
from mosaicdiff.eval import pixel_metrics, plots, quality, stats
from mosaicdiff.app import experiment
from mosaicdiff.zoo.data import load_digits_tensors

from _digits_run import prepare_run

PRUNED = ("mosaic", "uniform", "magnitude")
#: Metrics where lower is better (the rest: higher is better).
LOWER_IS_BETTER = ("fid", "kid", "speckle_rate", "speckled_images", "pixel_w1")


def _fid(features: np.ndarray, real: tuple[np.ndarray, np.ndarray]) -> float:
    mu, cov = quality.gaussian_stats(features)
    return quality.frechet_distance(mu, cov, *real)


def statistics(images: torch.Tensor, labels, dense: torch.Tensor | None, real_images: torch.Tensor,
               real_features: np.ndarray, real_stats) -> dict[str, Callable[[np.ndarray], float]]:
    """Every metric of `images` as a function of resampled image indices."""
    features = quality.classifier_features(images).double().numpy()
    speckle = pixel_metrics.speckle_rate(images).numpy()
    out = {
        "fid": lambda i: _fid(features[i], real_stats),
        "kid": pixel_metrics.kid_statistic(features, real_features),
        "speckle_rate": lambda i: speckle[i].mean(),
        "speckled_images": lambda i: (speckle[i] > 0).mean(),
        "pixel_w1": pixel_metrics.pixel_w1_statistic(images, real_images),
    }
    if labels is not None:
        correct = quality.correct_classes(images, labels).double().numpy()
        out["class_accuracy"] = lambda i: correct[i].mean()
    if dense is not None:
        psnr = quality.psnr(images, dense).clamp(max=100.0).numpy()
        ssim = pixel_metrics.ssim(images, dense).numpy()
        out["psnr_to_dense"] = lambda i: psnr[i].mean()
        out["ssim_to_dense"] = lambda i: ssim[i].mean()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[experiment.DEFAULT_SPARSITY])
    p.add_argument("--methods", nargs="+", default=list(PRUNED), choices=PRUNED)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=experiment.DEFAULT_NUM_SAMPLES)
    p.add_argument("--steps", type=int, default=experiment.DEFAULT_STEPS)
    p.add_argument("--guidance-scale", type=float, default=experiment.DEFAULT_GUIDANCE)
    p.add_argument("--samples-per-stage", type=int, default=experiment.DEFAULT_SAMPLES_PER_STAGE)
    p.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    p.add_argument("--reuse", action="store_true", help="load images_<name>.pt from --out where present")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    run = prepare_run(steps=args.steps, seed=args.seed, num_samples=args.num_samples,
                      samples_per_stage=args.samples_per_stage)

    def images_of(name: str, model_fn: Callable[[], torch.nn.Module]) -> torch.Tensor:
        path = args.out / f"images_{name}.pt"
        if args.reuse and path.exists():
            return torch.load(path)
        images, _ = run.sample(model_fn(), args.guidance_scale)
        torch.save(images, path)
        plots.save_image_grid(images, args.out / f"grid_{name}.png")
        return images

    jobs = [(sp, m) for sp in args.sparsities for m in args.methods]
    samples = {"dense": images_of("dense", lambda: run.dense)}
    for sp, method in tqdm(jobs, desc="prune + sample"):
        samples[f"{method}_{sp:g}"] = images_of(f"{method}_{sp:g}", lambda: run.prune(method, sp)[0])

    real_images, _ = load_digits_tensors()
    real_features = quality.real_features().double().numpy()
    real_stats = quality.real_stats()
    pick = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(args.seed))[:args.num_samples]
    stat = {"real": statistics(real_images[pick], None, None, real_images, real_features, real_stats)}
    for name, images in samples.items():
        stat[name] = statistics(images, run.labels, None if name == "dense" else samples["dense"],
                                real_images, real_features, real_stats)

    n = args.num_samples
    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "boundaries": list(run.boundaries), "sets": {}, "differences": {}}
    for name, fns in tqdm(stat.items(), desc="intervals"):
        row = {}
        for metric, fn in fns.items():
            # FID gets no interval of its own: resampling duplicates images, which shrinks the
            # feature covariance and inflates FID; its paired differences are the test.
            row[metric] = fn(np.arange(n)) if metric == "fid" else stats.bootstrap(fn, n, resamples=args.resamples)
        row["kid_subsets"] = dict(zip(("mean", "std"), pixel_metrics.kid(
            quality.classifier_features(real_images[pick] if name == "real" else samples[name]), real_features)))
        report["sets"][name] = row
    pairs = [(f"mosaic_{sp:g}", f"uniform_{sp:g}") for sp in args.sparsities
             if {"mosaic", "uniform"} <= set(args.methods)]
    pairs += [(name, "dense") for name in samples if name != "dense"]
    for a, b in tqdm(pairs, desc="paired differences"):
        report["differences"][f"{a} - {b}"] = {
            metric: stats.paired_difference(stat[a][metric], stat[b][metric], n, resamples=args.resamples)
            for metric in stat[a] if metric in stat[b]}
    write_json_atomic(args.out / "metrics.json", json.loads(json.dumps(report)))
    table = format_tables(report)
    write_text_atomic(args.out / "metrics.md", table)
    print(table)


def format_tables(report: dict) -> str:
    """Markdown tables of the sets (value [95% interval]) and of the paired differences."""
    metrics = ["fid", "kid", "class_accuracy", "psnr_to_dense", "ssim_to_dense", "speckle_rate", "speckled_images",
               "pixel_w1"]

    def cell(v, star: bool = False) -> str:
        if v is None:
            return "-"
        if isinstance(v, dict):
            mark = " *" if star and (v["low"] > 0 or v["high"] < 0) else ""
            return f"{v['value']:.4g} [{v['low']:.4g}, {v['high']:.4g}]{mark}"
        return f"{v:.4g}"

    lines = ["| set | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in report["sets"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(m)) for m in metrics) + " |")
    lines += ["", "| difference | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in report["differences"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(m), star=True) for m in metrics) + " |")
    lines.append("\n`*`: the paired 95% interval excludes 0. Lower is better for "
                 + ", ".join(LOWER_IS_BETTER) + "; higher for the rest.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
