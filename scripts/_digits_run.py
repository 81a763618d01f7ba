"""The command-line options and the experiment setup that the embedded-model quality scripts share.

Each of these scripts samples the demo's images (the same noise and labels for every model) on one
embedded digits model and writes a JSON report. `run_options` is the argparse parent parser of
their common options; `prepare_run` builds the `mosaicdiff.app.experiment.Experiment` they sample
from: the embedded model, its calibration data and the closed-form stage boundaries at the
default schedule settings (`mosaicdiff.method.schedule`), as the demo uses them.

    p = argparse.ArgumentParser(description=..., parents=[run_options(num_samples=100)])
    args = p.parse_args(argv)
    run = prepare_run_from_args(args)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mosaicdiff.app import experiment
from mosaicdiff.app.subjects import subject_named
from mosaicdiff.eval import measure
from mosaicdiff.method import schedule

DEFAULT_MODEL = "digits-dit"


def run_options(*, num_samples: int, models: Sequence[str] | None = None, out: Path | None = None,
                num_seeds: bool = False) -> argparse.ArgumentParser:
    """The parent parser (``parents=[...]``, its options listed first) of ``--out``, ``--steps``,
    ``--num-samples``, ``--samples-per-stage`` and ``--seed``.

    Args:
        num_samples: the default of ``--num-samples``.
        models: the choices of ``--model``; `None`: no ``--model`` option (``args.model`` is
            `DEFAULT_MODEL`).
        out: the default of ``--out`` (the JSON report); `None` makes ``--out`` required.
        num_seeds: add ``--num-seeds`` (noise seeds ``seed, seed + 1, ...``; ``--num-samples`` is
            then per seed); without it ``args.num_seeds`` is 1.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.set_defaults(model=DEFAULT_MODEL, num_seeds=1)  # what `prepare_run_from_args` reads, option or not
    if models is not None:
        p.add_argument("--model", default=DEFAULT_MODEL, choices=list(models), help="the embedded model")
    p.add_argument("--out", type=Path, default=out, required=out is None, help="the JSON report")
    p.add_argument("--steps", type=int, default=experiment.DEFAULT_STEPS, help="sampler steps")
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help="images per seed" if num_seeds else "images per model")
    if num_seeds:
        p.add_argument("--num-seeds", type=int, default=1, help="noise seeds (seed, seed + 1, ...)")
    p.add_argument("--samples-per-stage", type=int, default=experiment.DEFAULT_SAMPLES_PER_STAGE,
                   help="calibration samples per stage")
    p.add_argument("--seed", type=int, default=0, help="the noise and calibration seed")
    return p


def prepare_run(model: str = DEFAULT_MODEL, *, steps: int = experiment.DEFAULT_STEPS, seed: int = 0,
                num_samples: int = experiment.DEFAULT_NUM_SAMPLES,
                samples_per_stage: int = experiment.DEFAULT_SAMPLES_PER_STAGE,
                num_seeds: int = 1) -> experiment.Experiment:
    """The `Experiment` of the embedded `model` (a `mosaicdiff.app.subjects` name): its scheduler
    at `steps`, the closed-form stage boundaries at the default schedule settings, balanced labels
    and the noise of seeds ``seed .. seed + num_seeds - 1`` (`num_samples` images each), no
    progress bars."""
    return experiment.prepare(None, steps=steps, seed=seed, num_samples=num_samples,
                              samples_per_stage=samples_per_stage, boundaries=None,
                              speed_threshold=schedule.DEFAULT_SPEED_THRESHOLD,
                              log_snr_weight=schedule.DEFAULT_LOG_SNR_WEIGHT, progress=False,
                              subject=subject_named(model), num_seeds=num_seeds)


def prepare_run_from_args(args: argparse.Namespace) -> experiment.Experiment:
    """`prepare_run` with the settings of `args`, parsed by a parser with `run_options` parent."""
    return prepare_run(args.model, steps=args.steps, seed=args.seed, num_samples=args.num_samples,
                       samples_per_stage=args.samples_per_stage, num_seeds=args.num_seeds)


def summary_line(summary: dict) -> str:
    """PSNR to dense with its interval, SSIM, class accuracy and FID of a `measure` summary."""
    iv = summary["intervals"]["psnr_to_dense"]
    return (f"PSNR to dense {summary['psnr_to_dense']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}], "
            f"SSIM {summary['ssim_to_dense']:.4f}, acc {summary['class_accuracy']:.3f}, FID {summary['fid']:.1f}")


def paired_difference(measured: dict, name: str, base: str) -> dict:
    """`measure.difference` of model `name` minus model `base` (paired, with intervals), printed."""
    diff = measure.difference(measured[name], measured[base])
    print(f"{name} - {base}: {measure.format_difference(diff)}", flush=True)
    return diff
