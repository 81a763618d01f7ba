"""`mosaicdiff eval`: digits-FID against mean sparsity for each pruning method and guidance scale.

For every method and sparsity the embedded model (the digits DiT, or the digits U-Net with
``model_name="digits-unet"``) is pruned once; the pruned model is then sampled
at every guidance scale from the same noise (the same noise as the dense reference of that scale).
Writes ``eval.json`` (rewritten atomically after every point, so an interrupted sweep keeps what
finished) and ``fid_vs_sparsity.png`` (one panel per guidance scale, one line per method, the dense
model as a horizontal line). Every point carries 95% bootstrap intervals over its images (pooled
over ``num_seeds`` noise seeds) and ``comparisons`` the paired differences MosaicDiff - uniform per
(sparsity, guidance) with ``separated`` per metric (`mosaicdiff.eval.measure`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mosaicdiff.app.experiment import (
    COMPARED_METHODS,
    DEFAULT_GUIDANCES,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_NUM_SEEDS,
    DEFAULT_SAMPLES_PER_STAGE,
    DEFAULT_SPARSITIES,
    DEFAULT_STEPS,
    Experiment,
    ReportFile,
    check_methods,
    prepare,
    real_reference_fid,
    stage_info,
)
from mosaicdiff.app.subjects import subject_named
from mosaicdiff.eval import measure, plots
from mosaicdiff.method import schedule

logger = logging.getLogger(__name__)

__all__ = ["run_eval", "format_eval_table", "DEFAULT_SPARSITIES", "DEFAULT_GUIDANCES"]


def run_eval(
    out_dir: str | os.PathLike = "mosaicdiff_eval",
    *,
    sparsities=DEFAULT_SPARSITIES,
    guidance_scales=DEFAULT_GUIDANCES,
    methods=COMPARED_METHODS,
    seed: int = 0,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    steps: int = DEFAULT_STEPS,
    samples_per_stage: int = DEFAULT_SAMPLES_PER_STAGE,
    boundaries: tuple[int, int] | None = None,
    speed_threshold: float = schedule.DEFAULT_SPEED_THRESHOLD,
    log_snr_weight: float = schedule.DEFAULT_LOG_SNR_WEIGHT,
    progress: bool = True,
    model=None,
    model_name: str = "digits-dit",
    num_seeds: int = DEFAULT_NUM_SEEDS,
) -> dict:
    """Run the sweep; returns the result dict (also written to ``out_dir/eval.json``).

    The result has ``settings``, ``boundaries``, ``real_reference_fid``, ``dense`` (guidance ->
    metrics) and ``points``: one entry per (method, sparsity, guidance) with ``fid``,
    ``class_accuracy``, ``psnr_to_dense`` (with ``intervals``), ``seconds_per_sample`` and the
    per-stage sparsities; ``comparisons``: ``"<sparsity>/g=<guidance>"`` -> the paired differences
    mosaic - uniform. The other arguments are those of `mosaicdiff.app.demo.run_demo`.

    Raises:
        ValueError: on empty or out-of-range sweeps or unknown methods.
    """
    sparsities = [float(s) for s in sparsities]
    guidance_scales = [float(g) for g in guidance_scales]
    if not sparsities or any(not 0 <= s < 1 for s in sparsities):
        raise ValueError(f"eval: sparsities must be a non-empty list in [0, 1), got {sparsities}")
    if not guidance_scales:
        raise ValueError("eval: need at least one guidance scale")
    check_methods(methods, "eval")
    subject = subject_named(model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ReportFile(out / "eval.json", {
        "complete": False,
        "settings": {"model": subject.name, "num_seeds": int(num_seeds), "sparsities": sparsities, "guidance_scales": guidance_scales, "methods": list(methods),
                     "seed": seed, "num_samples": num_samples, "steps": steps,
                     "samples_per_stage": samples_per_stage, "speed_threshold": speed_threshold,
                     "log_snr_weight": log_snr_weight},
    })
    run = prepare(model, steps=steps, seed=seed, num_samples=num_samples, samples_per_stage=samples_per_stage,
                  boundaries=boundaries, speed_threshold=speed_threshold, log_snr_weight=log_snr_weight,
                  progress=progress, subject=subject, num_seeds=num_seeds)
    report.data.update(boundaries=list(run.boundaries), real_reference_fid=real_reference_fid(len(run.labels), seed),
                       dense={}, points=[], comparisons={})

    def save():
        report.save()
        plots.plot_fid_vs_sparsity(report.data, out / "fid_vs_sparsity.png")

    dense_images = _sample_dense(run, guidance_scales, report.data)
    save()
    measured: dict[tuple[str, float, float], measure.Measured] = {}
    for method in methods:
        for sparsity in sparsities:
            _sweep_guidance(run, method, sparsity, guidance_scales, dense_images, report.data, measured, save)
    report.data["complete"] = True
    save()
    return report.data


def _sample_dense(run: Experiment, guidance_scales: list[float], result: dict) -> dict[float, torch.Tensor]:
    """The dense reference at every guidance scale."""
    images_at = {}
    for g in guidance_scales:
        images, seconds = run.sample(run.dense, g)
        images_at[g] = images
        result["dense"][str(g)] = {**measure.measure(images, run.labels, None, run.per_seed).summary(),
                                   "seconds_per_sample": seconds}
    return images_at


def _sweep_guidance(run: Experiment, method: str, sparsity: float, guidance_scales: list[float],
                    dense_images: dict[float, torch.Tensor], result: dict, measured: dict, save) -> None:
    """Prune once, then sample and measure at every guidance scale (saving after each point)."""
    pruned, prune_seconds = run.prune(method, sparsity)
    for g in guidance_scales:
        images, seconds = run.sample(pruned, g)
        m = measured[method, sparsity, g] = measure.measure(images, run.labels, dense_images[g], run.per_seed)
        result["points"].append({
            "method": method, "sparsity": sparsity, "guidance_scale": g, **m.summary(),
            "seconds_per_sample": seconds, "prune_seconds": prune_seconds, "stages": stage_info(pruned),
        })
        pair = measured.get(("mosaic", sparsity, g)), measured.get(("uniform", sparsity, g))
        if None not in pair and method in ("mosaic", "uniform"):
            result["comparisons"][f"{sparsity:g}/g={g:g}"] = measure.difference(*pair)
        logger.info("eval %s s=%.2f g=%.2f: fid %.2f", method, sparsity, g, result["points"][-1]["fid"])
        save()


def format_eval_table(result: dict) -> str:
    """FID table: rows (method, sparsity), one column per guidance scale; then, per (sparsity,
    guidance), the paired differences mosaic - uniform (`measure.format_difference`)."""
    gs = result["settings"]["guidance_scales"]
    header = ["method", "sparsity"] + [f"FID g={g:g}" for g in gs]
    rows = [header, ["dense", "0"] + [f"{result['dense'][str(g)]['fid']:.2f}" for g in gs]]
    for method in result["settings"]["methods"]:
        for s in result["settings"]["sparsities"]:
            vals = []
            for g in gs:
                p = [q for q in result["points"] if q["method"] == method and q["sparsity"] == s
                     and q["guidance_scale"] == g]
                vals.append(f"{p[0]['fid']:.2f}" if p else "-")
            rows.append([method, f"{s:g}"] + vals)
    w = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(x) for c, x in zip(r, w)) for r in rows]
    for key, d in result.get("comparisons", {}).items():
        lines.append(f"mosaic - uniform at {key}: {measure.format_difference(d)}")
    return "\n".join(lines)
