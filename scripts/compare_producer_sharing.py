"""Quality of shared producer storage vs independent per-stage selection, with 95% intervals.

``prune(share_producers=True)`` makes the early and late stages keep subsets of the middle
stage's heads and channels (so one storage serves all stages); ``False`` lets every stage choose
freely. This runs both on the embedded digits DiT at each sparsity and several seeds (each seed:
its own initial noise, labels order and calibration draws; the dense model sees the same noise),
and reports per configuration FID to the real digits (pooled and per seed), class accuracy and
PSNR to the dense samples with bootstrap intervals over the pooled images, plus the paired difference
shared - independent (same noise and labels for both, so the pairing removes the seed noise).

    python scripts/compare_producer_sharing.py --out runs/sharing   # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mosaicdiff.core.atomic_io import write_json_atomic, write_text_atomic
from mosaicdiff import api
from mosaicdiff.eval import quality, stats
from mosaicdiff.core import sampling
from mosaicdiff.app import experiment

from _digits_run import prepare_run


def _metrics_inputs(images: torch.Tensor, labels: torch.Tensor, dense: torch.Tensor):
    """Per-image arrays the statistics resample: classifier features, correctness, PSNR to dense."""
    features = quality.classifier_features(images).double().numpy()
    correct = quality.correct_classes(images, labels).double().numpy()
    psnr = quality.psnr(images, dense).clamp(max=100.0).numpy()
    return features, correct, psnr


def _fid(features: np.ndarray, real) -> float:
    mu, cov = quality.gaussian_stats(features)
    return quality.frechet_distance(mu, cov, *real)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=200, help="images per seed and configuration")
    p.add_argument("--steps", type=int, default=experiment.DEFAULT_STEPS)
    p.add_argument("--guidance-scale", type=float, default=experiment.DEFAULT_GUIDANCE)
    p.add_argument("--samples-per-stage", type=int, default=experiment.DEFAULT_SAMPLES_PER_STAGE)
    p.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pooled: dict[str, list] = {}
    timing: dict[str, list[float]] = {}
    configs = [(sp, share) for sp in args.sparsities for share in (True, False)]
    for seed in tqdm(args.seeds, desc="seeds"):
        run = prepare_run(steps=args.steps, seed=seed, num_samples=args.num_samples,
                          samples_per_stage=args.samples_per_stage)
        dense, _ = run.sample(run.dense, args.guidance_scale)
        for sp, share in tqdm(configs, desc=f"seed {seed}", leave=False):
            t0 = time.perf_counter()
            mosaic = api.prune(run.dense, run.calibration, sp, method="mosaic", boundaries=run.boundaries,
                                   num_inference_steps=run.steps, scheduler=sampling.default_scheduler(),
                                   samples_per_stage=run.samples_per_stage, seed=seed, progress=False,
                                   share_producers=share)
            key = f"{sp:g}/{'shared' if share else 'independent'}"
            timing.setdefault(key, []).append(time.perf_counter() - t0)
            images, _ = run.sample(mosaic, args.guidance_scale)
            pooled.setdefault(key, []).append((_metrics_inputs(images, run.labels, dense),
                                               mosaic.memory_report()["ratio"]))

    real = quality.real_stats()
    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "configs": {}, "differences": {}}
    arrays = {}
    for key, runs in pooled.items():
        features = np.concatenate([r[0][0] for r in runs])
        correct = np.concatenate([r[0][1] for r in runs])
        psnr = np.concatenate([r[0][2] for r in runs])
        arrays[key] = (features, correct, psnr)
        n = len(correct)
        report["configs"][key] = {
            "images": n, "memory_ratio": runs[0][1], "prune_seconds": float(np.mean(timing[key])),
            # resampling with replacement duplicates images, which shrinks the feature covariance
            # and inflates FID: a percentile interval of FID itself would be biased upward, so the
            # pooled value and the per-seed values (N = --num-samples each) are reported instead;
            # the paired difference below is what compares the two layouts.
            "fid": _fid(features, real),
            "fid_per_seed": [_fid(r[0][0], real) for r in runs],
            "class_accuracy": stats.bootstrap(lambda i, c=correct: c[i].mean(), n, resamples=args.resamples),
            "psnr_to_dense": stats.bootstrap(lambda i, q=psnr: q[i].mean(), n, resamples=args.resamples),
        }
    for sp in args.sparsities:
        (fa, ca, pa), (fb, cb, pb) = arrays[f"{sp:g}/shared"], arrays[f"{sp:g}/independent"]
        n = len(ca)
        report["differences"][f"{sp:g}"] = {
            "fid": stats.paired_difference(lambda i: _fid(fa[i], real), lambda i: _fid(fb[i], real), n,
                                           resamples=args.resamples),
            "class_accuracy": stats.paired_difference(lambda i: ca[i].mean(), lambda i: cb[i].mean(), n,
                                                      resamples=args.resamples),
            "psnr_to_dense": stats.paired_difference(lambda i: pa[i].mean(), lambda i: pb[i].mean(), n,
                                                     resamples=args.resamples),
        }
    write_json_atomic(args.out / "sharing.json", json.loads(json.dumps(report)))
    lines = ["| mean sparsity | producers | memory ratio | FID (pooled; per seed) | class acc | PSNR to dense (dB) |",
             "|---|---|---|---|---|---|"]
    for key, c in report["configs"].items():
        sp, mode = key.split("/")
        per_seed = ", ".join(f"{v:.1f}" for v in c["fid_per_seed"])
        lines.append(f"| {sp} | {mode} | {c['memory_ratio']:.3f} | {c['fid']:.1f}; {per_seed} | {c['class_accuracy']} | "
                     f"{c['psnr_to_dense']} |")
    lines += ["", "| mean sparsity | shared - independent: FID | class acc | PSNR (dB) |", "|---|---|---|---|"]
    for sp, d in report["differences"].items():
        mark = {k: ("" if not v.excludes_zero else " *") for k, v in d.items()}
        lines.append(f"| {sp} | {d['fid']}{mark['fid']} | {d['class_accuracy']}{mark['class_accuracy']} | "
                     f"{d['psnr_to_dense']}{mark['psnr_to_dense']} |")
    lines.append("\n`*`: the 95% interval excludes 0 (a real difference); otherwise within the noise.")
    write_text_atomic(args.out / "sharing.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
