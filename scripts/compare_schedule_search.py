"""MosaicDiff's closed-form three stages vs a searched 10-stage schedule (Diff-ES-style baseline).

On the embedded digits DiT at each mean sparsity: ``Experiment.prune("mosaic", s)`` (closed-form
boundaries and allocation, three stages) against `mosaicdiff.search.search.search_schedule`
(10 uniform stages, per-stage sparsities found by a (mu + lambda) evolution strategy under the
same step-weighted mean, fitness = mean PSNR to the dense samples on 32 held-out noises and
labels of their own seed, sampled with DDIM-25 for speed; the mean is over DDIM-50's steps).
Both prune every stage with OBS on that stage's own calibration (seed 0). Each pruned model is
evaluated on the demo's setup: DDIM-50, CFG 1.5, 200 samples from the noise of each evaluation
seed (``prepare(seed=k)``), images pooled over the seeds. Reported: class accuracy and PSNR to
the dense samples with 95% bootstrap intervals, FID (pooled and per seed; no interval of its
own), the paired differences search - mosaic with intervals (``--methods mosaic uniform`` adds
the search's starting point, every stage at the target, and its difference), the pruning time
(the search included), the number of stage models and ``memory_report()["ratio"]``.

The report is rewritten atomically after every pruned-and-evaluated model, so an interrupted run
keeps what finished. Long: run it under ``nice -n 10`` with ``OMP_NUM_THREADS=1``:

    OMP_NUM_THREADS=1 nice -n 10 python scripts/compare_schedule_search.py --out /work/runs/search \\
        --copy-json docs/data/schedule_search.json
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mosaicdiff.core.atomic_io import json_safe, write_bytes_atomic, write_json_atomic, write_text_atomic
from mosaicdiff.eval import quality, stats
from mosaicdiff.core import sampling
from mosaicdiff.app import experiment
from mosaicdiff.search.search import DEFAULT_GRID, DEFAULT_NUM_STAGES, DEFAULT_S_CAP, search_schedule
from mosaicdiff.search.es import EvolutionConfig
from mosaicdiff.search.fitness import HeldOutFidelity

#: "uniform": the search's starting point alone (N uniform stages, each at the target, the same
#: per-stage calibration and OBS): what the finer stages give without the search.
METHODS = ("mosaic", "search", "uniform")


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["mosaic", "search"],
                   help="compared with mosaic (always run first)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation noise seeds")
    p.add_argument("--num-samples", type=int, default=experiment.DEFAULT_NUM_SAMPLES, help="images per seed")
    p.add_argument("--steps", type=int, default=experiment.DEFAULT_STEPS)
    p.add_argument("--guidance-scale", type=float, default=experiment.DEFAULT_GUIDANCE)
    p.add_argument("--samples-per-stage", type=int, default=experiment.DEFAULT_SAMPLES_PER_STAGE)
    search = p.add_argument_group("search")
    search.add_argument("--num-stages", type=int, default=DEFAULT_NUM_STAGES)
    search.add_argument("--grid", type=float, default=DEFAULT_GRID)
    search.add_argument("--s-cap", type=float, default=DEFAULT_S_CAP)
    search.add_argument("--population", type=int, default=4)
    search.add_argument("--offspring", type=int, default=10)
    search.add_argument("--generations", type=int, default=15)
    search.add_argument("--max-moves", type=int, default=3)
    search.add_argument("--patience", type=int, default=6, help="stop after this many generations without gain")
    search.add_argument("--search-seed", type=int, default=0)
    search.add_argument("--fitness-images", type=int, default=32)
    search.add_argument("--fitness-seed", type=int, default=1000)
    search.add_argument("--fitness-steps", type=int, default=25,
                        help="DDIM steps of the fitness's samples (fewer than the evaluation's, for speed)")
    p.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--copy-json", type=Path, default=None, help="also write the raw JSON here (e.g. docs/data/)")
    args = p.parse_args()
    args.methods = ["mosaic"] + [m for m in dict.fromkeys(args.methods) if m != "mosaic"]
    if args.fitness_seed in args.seeds:
        p.error(f"--fitness-seed {args.fitness_seed} is one of the evaluation --seeds {args.seeds}: the search's "
                f"held-out images must differ from the evaluation images")
    return args


def _per_image(images: torch.Tensor, labels: torch.Tensor, dense: torch.Tensor) -> dict[str, np.ndarray]:
    """What the statistics resample: classifier features, correctness and PSNR to dense, per image."""
    return {"features": quality.classifier_features(images).double().numpy(),
            "correct": quality.correct_classes(images, labels).double().numpy(),
            "psnr": quality.psnr(images, dense).clamp(max=100.0).numpy()}


def _fid(features: np.ndarray, real) -> float:
    mu, cov = quality.gaussian_stats(features)
    return quality.frechet_distance(mu, cov, *real)


def _pooled(per_seed: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in per_seed]) for k in per_seed[0]}


def _summary(per_seed, real, resamples: int) -> dict:
    a = _pooled(per_seed)
    n = len(a["correct"])
    return {"images": n, "fid": _fid(a["features"], real), "fid_per_seed": [_fid(p["features"], real) for p in per_seed],
            "class_accuracy": stats.bootstrap(lambda i: a["correct"][i].mean(), n, resamples=resamples),
            "psnr_to_dense": stats.bootstrap(lambda i: a["psnr"][i].mean(), n, resamples=resamples)}


def _difference(per_seed_a, per_seed_b, real, resamples: int) -> dict:
    a, b = _pooled(per_seed_a), _pooled(per_seed_b)
    n = len(a["correct"])
    return {"fid": stats.paired_difference(lambda i: _fid(a["features"][i], real), lambda i: _fid(b["features"][i], real),
                                           n, resamples=resamples),
            "class_accuracy": stats.paired_difference(lambda i: a["correct"][i].mean(), lambda i: b["correct"][i].mean(),
                                                      n, resamples=resamples),
            "psnr_to_dense": stats.paired_difference(lambda i: a["psnr"][i].mean(), lambda i: b["psnr"][i].mean(),
                                                     n, resamples=resamples)}


def _save_arrays(path: Path, arrays: dict[str, list[dict[str, np.ndarray]]]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"{key}/seed{i}/{name}": v for key, runs in arrays.items()
                                   for i, run in enumerate(runs) for name, v in run.items()})
    write_bytes_atomic(path, buffer.getvalue())


def _table(report: dict) -> str:
    lines = ["| mean sparsity | method | stages | memory ratio | prune time (s) | FID (pooled; per seed) | class acc | "
             "PSNR to dense (dB) | per-stage sparsity (high t first) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, c in report["configs"].items():
        sp, method = key.split("/") if "/" in key else ("-", key)
        per_seed = ", ".join(f"{v:.1f}" for v in c["fid_per_seed"])
        sparsities = " / ".join(f"{v:.2f}" for v in c["stage_sparsities"])
        lines.append(f"| {sp} | {method} | {c['num_stages']} | {c['memory_ratio']:.3f} | {c['prune_seconds']:.1f} | "
                     f"{c['fid']:.1f}; {per_seed} | {stats.Interval(**c['class_accuracy'])} | "
                     f"{stats.Interval(**c['psnr_to_dense']) if c['psnr_to_dense'] else '-'} | {sparsities} |")
    if report["differences"]:
        lines += ["", "| mean sparsity | paired difference | FID | class acc | PSNR (dB) |", "|---|---|---|---|---|"]
        for key, d in report["differences"].items():
            sp, method = key.split("/") if "/" in key else (key, "search")
            cells = []
            for metric in ("fid", "class_accuracy", "psnr_to_dense"):
                interval = stats.Interval(**d[metric])
                cells.append(f"{interval}{' *' if interval.excludes_zero else ''}")
            lines.append(f"| {sp} | {method} - mosaic | " + " | ".join(cells) + " |")
        lines.append("\n`*`: the 95% interval excludes 0.")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    environment = {**experiment.environment(), "load_average_at_start": os.getloadavg()}
    report = experiment.ReportFile(args.out / "schedule_search.json",
                                   {"settings": settings, "environment": environment,
                                    "configs": {}, "differences": {}, "searches": {}, "uniform_stages": {}})

    def save() -> None:
        report.data["environment"]["load_average_now"] = os.getloadavg()  # the machine is shared: timings vary
        report.save()
        write_text_atomic(args.out / "schedule_search.md", _table(report.data))
        if args.copy_json is not None:
            write_json_atomic(args.copy_json, json_safe(report.data), indent=2)

    with report.keeping_errors():
        common = dict(steps=args.steps, num_samples=args.num_samples, samples_per_stage=args.samples_per_stage,
                      boundaries=None, speed_threshold=0.55, log_snr_weight=0.0, progress=False)
        runs = [experiment.prepare(None, seed=args.seeds[0], **common)]
        runs += [experiment.prepare(runs[0].dense, seed=s, **common) for s in args.seeds[1:]]
        dense = runs[0].dense
        t0 = time.perf_counter()
        dense_images = [run.sample(dense, args.guidance_scale)[0] for run in tqdm(runs, desc="dense samples")]
        report.data["dense_sampling_seconds"] = time.perf_counter() - t0
        real = quality.real_stats()
        report.data["configs"]["dense"] = _summary(
            [_per_image(im, run.labels, im) for im, run in zip(dense_images, runs)], real, args.resamples)
        report.data["configs"]["dense"]["psnr_to_dense"] = None  # itself
        report.data["configs"]["dense"].update(num_stages=1, memory_ratio=1.0, prune_seconds=0.0, stage_sparsities=[0.0])
        # the search's objective (its dense reference samples are part of the search's cost); the
        # closed-form model is scored on it too
        t0 = time.perf_counter()
        held_out = HeldOutFidelity.from_dense(dense, args.fitness_images, seed=args.fitness_seed,
                                              num_inference_steps=args.fitness_steps,
                                              guidance_scale=args.guidance_scale)
        held_out_seconds = time.perf_counter() - t0
        save()
        arrays: dict[str, list[dict[str, np.ndarray]]] = {}
        evolution = EvolutionConfig(population=args.population, offspring=args.offspring,
                                    generations=args.generations, max_moves=args.max_moves,
                                    patience=args.patience, seed=args.search_seed)
        for sp in args.sparsities:
            for method in args.methods:
                key = f"{sp:g}/{method}"
                t0 = time.perf_counter()
                if method == "mosaic":
                    model, _ = runs[0].prune("mosaic", sp)
                else:
                    budget = evolution if method == "search" else EvolutionConfig(population=1, offspring=1,
                                                                                   generations=0)
                    model, log = search_schedule(
                        dense, runs[0].calibration, sp, num_stages=args.num_stages, grid=args.grid, s_cap=args.s_cap,
                        evolution=budget, num_inference_steps=args.steps, scheduler=sampling.default_scheduler(),
                        fitness=held_out, guidance_scale=args.guidance_scale,
                        samples_per_stage=args.samples_per_stage, seed=runs[0].seed, progress=True)
                    report.data["searches" if method == "search" else "uniform_stages"][f"{sp:g}"] = log
                prune_seconds = time.perf_counter() - t0 + (held_out_seconds if method == "search" else 0.0)
                arrays[key] = [_per_image(run.sample(model, args.guidance_scale)[0], run.labels, ref)
                               for run, ref in zip(tqdm(runs, desc=f"sampling {key}", leave=False), dense_images)]
                meta = model.meta
                report.data["configs"][key] = {
                    **_summary(arrays[key], real, args.resamples),
                    "num_stages": model.num_stages, "memory_ratio": model.memory_report()["ratio"],
                    "shared_producers": model.config.get("shared_producers") is not None,
                    "prune_seconds": prune_seconds, "stage_ranges": experiment.stage_info(model),
                    "stage_sparsities": [r[3] for r in model.stage_ranges],
                    "mean_sparsity": experiment.step_mean_sparsity(model, runs[0].scheduler.timesteps),
                    "realized_mean_sparsity": meta.get("realized_mean_sparsity"),
                    "held_out_fitness": held_out(model),
                }
                if method != "mosaic":  # paired with the closed-form model; "0.3" is search - mosaic
                    name = f"{sp:g}" if method == "search" else key
                    report.data["differences"][name] = _difference(arrays[key], arrays[f"{sp:g}/mosaic"], real,
                                                                   args.resamples)
                save()
                _save_arrays(args.out / "per_image.npz", arrays)
    print(_table(report.data))


if __name__ == "__main__":
    main()
