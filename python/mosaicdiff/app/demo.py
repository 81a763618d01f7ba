"""`mosaicdiff demo`: MosaicDiff end to end on an embedded digits model, on a CPU, in minutes.

The model is the class-conditional digits DiT (default), the text-conditioned digits U-Net
(``model_name="digits-unet"``, whose transformer blocks are pruned as SDXL's are) or the digits
PixArt (``model_name="digits-pixart"``: adaLN-single, self- and cross-attention heads pruned).

Steps: load the embedded model; divide the trajectory (closed-form score, boundaries from the
noise schedule); sample the dense model once with its trajectory (for the measured curve and as
the fixed-noise reference); prune with MosaicDiff (three stage subnetworks, the middle stage pruned
least) and with two baselines at the same mean sparsity (``uniform``: one OBS-pruned network for
all timesteps, calibrated on t uniform over [0, T); ``magnitude``: one network, least-norm heads and
channels dropped, no compensation); sample every model from the same noise; measure digits-FID
against the 1797 real digits, class accuracy of the requested digits, PSNR to the dense images
and seconds per sample. With ``num_seeds`` > 1 every model is sampled from the noise of each seed
(``num_samples`` images each) and the images are pooled. Every per-image metric gets a 95%
bootstrap interval, FID its per-seed values, and ``comparisons`` holds the paired differences
MosaicDiff - baseline with ``separated`` (the interval excludes 0) per metric
(`mosaicdiff.eval.measure`). ``stage_curve`` is QF3: the Pearson correlation of the closed-form
and the measured learning-speed curves along the dense run (`mosaicdiff.method.schedule.curve_agreement`).

Outputs in ``--out`` (default ``./mosaicdiff_demo``): ``report.json`` (rewritten atomically after
every method, so an interrupted run keeps what finished), ``grid_<method>.png`` (same noise and
labels in every grid; column = digit class) and ``stages.png``.

The defaults (steps, guidance, samples, calibration samples per stage, sparsity) are in
`mosaicdiff.app.experiment`; the measurements behind them are in docs/results.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mosaicdiff.app.experiment import (
    COMPARED_METHODS,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_NUM_SEEDS,
    DEFAULT_SAMPLES_PER_STAGE,
    DEFAULT_SPARSITY,
    DEFAULT_STEPS,
    Experiment,
    ReportFile,
    check_methods,
    environment,
    prepare,
    real_reference_fid,
    real_reference_images,
    stage_info,
    step_mean_sparsity,
)
from mosaicdiff.app.subjects import subject_named
from mosaicdiff.eval import measure, pixel_metrics, plots
from mosaicdiff.method import schedule

logger = logging.getLogger(__name__)

__all__ = ["format_table", "run_demo"]


def run_demo(
    out_dir: str | os.PathLike = "mosaicdiff_demo",
    *,
    sparsity: float = DEFAULT_SPARSITY,
    seed: int = 0,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    guidance_scale: float | None = None,
    steps: int = DEFAULT_STEPS,
    samples_per_stage: int = DEFAULT_SAMPLES_PER_STAGE,
    methods: tuple[str, ...] = COMPARED_METHODS,
    boundaries: tuple[int, int] | None = None,
    speed_threshold: float = schedule.DEFAULT_SPEED_THRESHOLD,
    log_snr_weight: float = schedule.DEFAULT_LOG_SNR_WEIGHT,
    progress: bool = True,
    model=None,
    model_name: str = "digits-dit",
    num_seeds: int = DEFAULT_NUM_SEEDS,
) -> dict:
    """Run the demo and return the report (also written to ``out_dir/report.json``).

    Args:
        out_dir: output directory (created).
        sparsity: target mean sparsity of every pruned model (averaged over sampling steps).
        seed: seeds the initial noise (shared by all methods) and the calibration draws.
        num_samples: images per method and noise seed (labels 0..9 cycling).
        guidance_scale: CFG scale for every method (default: the embedded model's,
            `mosaicdiff.app.subjects`: 1.5, or 3 for ``"digits-pixart"``).
        steps: DDIM steps.
        samples_per_stage: calibration samples per stage (each duplicated with the null class).
        methods: pruning methods to compare with the dense model.
        boundaries: explicit `(t_low, t_high)` of the middle stage; default from the closed-form score.
        speed_threshold, log_snr_weight: the closed-form stage split (the paper's ``M`` and
            ``lambda``), see `mosaicdiff.method.schedule.stage_boundaries`.
        progress: show tqdm bars.
        model: the dense model (default: the embedded model `model_name`); a DiT shaped like the
            digits DiT for ``"digits-dit"``.
        model_name: the embedded model, ``"digits-dit"``, ``"digits-unet"`` or ``"digits-pixart"``
            (`mosaicdiff.app.subjects`).
        num_seeds: noise seeds ``seed, seed + 1, ...``; the images of all are pooled.

    Returns:
        The report dict (see the module docstring and README for the keys).

    Raises:
        ValueError: on invalid arguments.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"demo: sparsity must be in [0, 1), got {sparsity}")
    if num_samples < 2:
        raise ValueError(f"demo: num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
    check_methods(methods, "demo")
    subject = subject_named(model_name)
    guidance_scale = subject.guidance_scale if guidance_scale is None else guidance_scale
    if int(num_seeds) < 1:
        raise ValueError(f"demo: num_seeds must be >= 1, got {num_seeds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ReportFile(out / "report.json", {
        "complete": False,
        "settings": {"model": subject.name, "sparsity": sparsity, "seed": seed, "num_samples": num_samples,
                     "num_seeds": int(num_seeds),
                     "guidance_scale": guidance_scale, "steps": steps, "samples_per_stage": samples_per_stage,
                     "methods": list(methods), "speed_threshold": speed_threshold,
                     "log_snr_weight": log_snr_weight, "sampler": subject.sampler},
        "environment": environment(),
        "methods": {},
    })
    with report.keeping_errors():
        run = prepare(model, steps=steps, seed=seed, num_samples=num_samples, samples_per_stage=samples_per_stage,
                      boundaries=boundaries, speed_threshold=speed_threshold, log_snr_weight=log_snr_weight,
                      progress=progress, subject=subject, num_seeds=num_seeds)
        _record_setup(run, report.data)
        dense_images = _sample_dense(run, guidance_scale, report, out)
        measured = {}
        for method in methods:
            measured[method] = _compare_pruned(run, method, sparsity, guidance_scale, dense_images, report, out)
            _record_comparisons(measured, method, report)
        report.data["complete"] = True
    report.save()
    return report.data


def _record_setup(run: Experiment, report: dict) -> None:
    """The stages every method shares and the FID floor of real digits at this sample count."""
    report["boundaries"] = list(run.boundaries)
    report["x0_sq_norm"] = run.calibration.x0_sq_norm
    report["steps_per_stage"] = schedule.steps_per_stage(run.scheduler.timesteps, run.stages)
    report["real_reference_fid"] = real_reference_fid(len(run.labels), run.seed)
    report["real_reference_fid_per_seed"] = real_reference_fid(run.per_seed, run.seed)
    report["real_reference_pixel_w1"] = pixel_metrics.pixel_w1_to_real(real_reference_images(len(run.labels), run.seed))


def _grid(run: Experiment, images: torch.Tensor, path: Path) -> None:
    """The first seed's images (one digit class per column)."""
    plots.save_image_grid(images[:run.per_seed], path)


def _sample_dense(run: Experiment, guidance_scale: float, report: ReportFile, out: Path) -> torch.Tensor:
    """Sample the dense model (the reference of every method) with its trajectory, plot the stages."""
    logger.info("sampling the dense model (%d images, %d steps)", len(run.labels), run.steps)
    (images, traj), seconds = run.sample(run.dense, guidance_scale, return_trajectory=True)
    report.data["methods"]["dense"] = {**measure.measure(images, run.labels, None, run.per_seed).summary(),
                                       "psnr_to_dense": None,  # the reference itself (PSNR would be inf)
                                       "seconds_per_sample": seconds, "sparsity": 0.0}
    _grid(run, images, out / "grid_dense.png")
    mse, _ = schedule.empirical_curve(traj.xs, images, traj.timesteps)
    report.data["empirical_curve"] = {"timesteps": traj.timesteps.tolist(), "mse": mse.tolist()}
    report.data["stage_curve"] = schedule.curve_agreement(run.process, traj.timesteps, mse,
                                                          run.calibration.x0_sq_norm)
    plots.plot_stage_curves(out / "stages.png", run.process, run.boundaries,
                            empirical=(traj.timesteps.tolist(), mse.tolist()), x0_sq_norm=run.calibration.x0_sq_norm,
                            title=f"{run.subject.title}, {run.steps} steps: stages {run.boundaries}")
    report.save()
    return images


def _compare_pruned(run: Experiment, method: str, sparsity: float, guidance_scale: float,
                    dense_images: torch.Tensor, report: ReportFile, out: Path) -> measure.Measured:
    """Prune with `method`, sample from the dense model's noise, measure against the dense images."""
    logger.info("pruning: %s at mean sparsity %.2f", method, sparsity)
    pruned, prune_seconds = run.prune(method, sparsity)
    images, seconds = run.sample(pruned, guidance_scale)
    meta = pruned.config.meta or {}
    measured = measure.measure(images, run.labels, dense_images, run.per_seed)
    report.data["methods"][method] = {
        **measured.summary(), "seconds_per_sample": seconds,
        "prune_seconds": prune_seconds, "stages": stage_info(pruned),
        "mean_sparsity": step_mean_sparsity(pruned, run.scheduler.timesteps),
        "realized_mean_sparsity": meta.get("realized_mean_sparsity"), "stage_widths": meta.get("stage_widths"),
        "memory": pruned.memory_report(),
    }
    _grid(run, images, out / f"grid_{method}.png")
    report.save()
    return measured


def _record_comparisons(measured: dict[str, measure.Measured], newest: str, report: ReportFile) -> None:
    """Paired differences MosaicDiff (three stages, then stepwise) - each other method, for the pairs
    the newest method completes ("mosaic - stepwise" rather than its negative)."""
    comparisons = report.data.setdefault("comparisons", {})
    for lead in _LEADS:
        if lead not in measured:
            continue
        others = [m for m in measured if m != lead and not (m in _LEADS and _LEADS.index(m) < _LEADS.index(lead))]
        for m in others if newest == lead else [newest] if newest in others else []:
            comparisons[f"{lead} - {m}"] = measure.difference(measured[lead], measured[m])
    report.save()


#: The methods whose paired differences to the others the report gives, in this order.
_LEADS = ("mosaic", "stepwise")


def _with_interval(m: dict, name: str, fmt: str) -> str:
    value = m.get(name)
    if value is None:
        return "-"
    iv = (m.get("intervals") or {}).get(name)
    return format(value, fmt) + (f" [{iv['low']:{fmt}}, {iv['high']:{fmt}}]" if iv else "")


def format_table(report: dict) -> str:
    """A plain-text table of the per-method results of a demo report (95% intervals in brackets),
    then the paired differences MosaicDiff - baseline and whether each is separated from 0."""
    rows = [("method", "FID", "W1 x100", "speckle %", "class acc", "PSNR->dense (dB)", "s/sample", "sparsity")]
    for name, m in report.get("methods", {}).items():
        sp = m.get("mean_sparsity", m.get("sparsity", 0.0))
        if "stages" in m:
            sp_s = f"{sp:.2f} (" + "/".join(f"{s['sparsity']:.2f}" for s in m["stages"].values()) + ")"
        else:
            sp_s = f"{sp:.2f}"
        w1, speckle = m.get("pixel_w1"), m.get("speckle_rate")
        rows.append((name, f"{m['fid']:.2f}", "-" if w1 is None else f"{100 * w1:.2f}",
                     "-" if speckle is None else f"{100 * speckle:.2f}", _with_interval(m, "class_accuracy", ".3f"),
                     _with_interval(m, "psnr_to_dense", ".2f"), f"{m['seconds_per_sample']:.3f}", sp_s))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    settings = report.get("settings", {})
    if "real_reference_fid" in report:
        n, k = settings.get("num_samples"), settings.get("num_seeds", 1)
        w1 = report.get("real_reference_pixel_w1")
        lines.append(f"({n * k} real digits vs all 1797: FID {report['real_reference_fid']:.2f}"
                     + ("" if w1 is None else f", W1 x100 {100 * w1:.2f}, speckle 0")
                     + f"; {n} images x {k} noise seeds per method; stage boundaries {report.get('boundaries')})")
    for pair, d in report.get("comparisons", {}).items():
        lines.append(f"{pair}: {measure.format_difference(d)}")
    if "stage_curve" in report:
        c = report["stage_curve"]
        lines.append(f"QF3: Pearson(closed form, measured) MSE {c['pearson_mse']:.3f}, "
                     f"learning speed {c['pearson_rate']:.3f} over {c['steps']} steps")
    return "\n".join(lines)
