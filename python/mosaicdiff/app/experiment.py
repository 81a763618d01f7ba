"""The steps `mosaicdiff demo` and `mosaicdiff eval` share, on an embedded digits model.

An `Experiment` holds what every compared model sees: the dense model, its calibration data,
the stage boundaries, the labels and one initial noise. Its `prune` and `sample` time the work;
`mosaicdiff.eval.measure` scores images; a `ReportFile` is the JSON report, rewritten atomically after
every finished step so that an interrupted run keeps what finished.

The defaults below were chosen by measurements recorded in docs/results.md ("Demo settings").
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosaicdiff import api
from mosaicdiff.app.inputs import sample_labels
from mosaicdiff.core import sampling
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.core.schedulers import noise_process
from mosaicdiff.eval import quality
from mosaicdiff.method import pruning, schedule, step_allocation
from mosaicdiff.zoo.data import NUM_CLASSES

#: Methods compared with the dense model by default: the paper's three stages and the baselines
#: of its kind, not "random" (a floor any pruner beats, not a baseline worth a row).
COMPARED_METHODS = ("mosaic", "uniform", "magnitude")
#: Methods a run may name: every `pruning.METHODS` but "random", and the searched schedule
#: (`mosaicdiff.app.searched`: minutes of evolution search per sparsity, so only on request).
KNOWN_METHODS = tuple(m for m in pruning.METHODS if m != "random") + ("searched",)
DEFAULT_SPARSITY = 0.5
#: The FID optimum of the dense model's guidance sweep (docs/results.md, "Demo settings").
DEFAULT_GUIDANCE = 1.5
#: Enough samples for the small-sample FID floor to resolve method differences (docs/results.md).
DEFAULT_NUM_SAMPLES = 200
#: Noise seeds per method (images pooled): see docs/results.md ("Intervals") for what it separates.
DEFAULT_NUM_SEEDS = 1
DEFAULT_SAMPLES_PER_STAGE = 128
DEFAULT_STEPS = 50
#: The sweep of `mosaicdiff eval`.
DEFAULT_SPARSITIES = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_GUIDANCES = (1.5, 3.0)


def check_methods(methods, command: str) -> None:
    """Raises ValueError naming the entries of `methods` that are not `KNOWN_METHODS`."""
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown:
        raise ValueError(f"{command}: unknown methods {unknown}; expected a subset of {list(KNOWN_METHODS)}")


@dataclass
class Experiment:
    """The shared inputs of one demo or eval run; build it with `prepare`.

    ``labels`` and ``noise`` hold ``len(seeds)`` blocks of ``per_seed`` images: block k is seed
    ``seeds[k]``'s noise with the balanced labels, so every method sees the same images' noise.
    """

    subject: Any  # a `mosaicdiff.app.subjects` subject: how to load, calibrate and sample the model
    dense: nn.Module
    calibration: Any  # `Calibration` (DiT) or `TextCalibration` (U-Net)
    scheduler: Any  # the sampler's scheduler, set to `steps` timesteps
    boundaries: tuple[int, int]
    labels: torch.Tensor
    noise: torch.Tensor
    steps: int
    seed: int
    seeds: tuple[int, ...]
    samples_per_stage: int
    speed_threshold: float
    log_snr_weight: float
    progress: bool

    @property
    def per_seed(self) -> int:
        return len(self.labels) // len(self.seeds)

    @property
    def process(self):
        """The sampler's forward process (DDPM, or rectified flow for the MMDiT)."""
        return noise_process(self.scheduler)

    @property
    def stages(self):
        """(name, t_start, t_end) of the early, middle and late stage."""
        return schedule.stages_from_boundaries(*self.boundaries, T=self.process.timestep_end)

    def prune(self, method: str, sparsity: float, **options) -> tuple[nn.Module, float]:
        """`mosaicdiff.prune` of the dense model at this run's stages (`options`: more of its keyword
        arguments, e.g. ``share_producers``); returns (mosaic, seconds)."""
        t0 = time.perf_counter()
        if method == "searched":
            from mosaicdiff.app.searched import searched_mosaic

            pruned, _ = searched_mosaic(self, sparsity, self.subject.guidance_scale)
            return pruned, time.perf_counter() - t0
        pruned = api.prune(
            self.dense, self.calibration, sparsity, method=method, boundaries=self.boundaries,
            num_inference_steps=self.steps, scheduler=self.subject.scheduler(),
            samples_per_stage=self.samples_per_stage, speed_threshold=self.speed_threshold,
            log_snr_weight=self.log_snr_weight, seed=self.seed, progress=self.progress, align=self.subject.align,
            **(({"num_stages": min(step_allocation.DEFAULT_NUM_STAGES, self.steps)} if method == "stepwise" else {})
               | options))  # an option overrides the default stage count
        return pruned, time.perf_counter() - t0

    def sample(self, model: nn.Module, guidance_scale: float, *, return_trajectory: bool = False):
        """The subject's sampler from this run's labels and noise; returns (result, seconds per image)."""
        warmup(self.subject, model, int(self.labels[0]))
        t0 = time.perf_counter()
        result = self.subject.sample(model, self.labels, self.noise, steps=self.steps, guidance_scale=guidance_scale,
                                     progress=self.progress, return_trajectory=return_trajectory)
        return result, (time.perf_counter() - t0) / len(self.labels)


def prepare(model: nn.Module | None, *, steps: int, seed: int, num_samples: int, samples_per_stage: int,
            boundaries: tuple[int, int] | None, speed_threshold: float, log_snr_weight: float,
            progress: bool, subject=None, num_seeds: int = 1) -> Experiment:
    """Load the dense model (default: the subject's embedded one), the digits calibration data, the
    stage boundaries (closed form unless given), balanced labels and the initial noise of seeds
    ``seed .. seed + num_seeds - 1`` (`num_samples` images each).

    Args:
        subject: a `mosaicdiff.app.subjects` subject (default the digits DiT).
    """
    from mosaicdiff.app.subjects import DigitsDiT

    if int(num_seeds) < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    subject = subject if subject is not None else DigitsDiT()
    dense = model if model is not None else subject.load()
    calibration = subject.calibration(dense)
    scheduler = subject.scheduler()
    scheduler.set_timesteps(steps)
    if boundaries is None:
        boundaries = schedule.stage_boundaries(noise_process(scheduler), speed_threshold=speed_threshold,
                                               log_snr_weight=log_snr_weight, x0_sq_norm=calibration.x0_sq_norm)
    seeds = tuple(int(seed) + k for k in range(int(num_seeds)))
    return Experiment(
        subject=subject, dense=dense, calibration=calibration, scheduler=scheduler,
        boundaries=(int(boundaries[0]), int(boundaries[1])),
        labels=sample_labels(num_samples, NUM_CLASSES).repeat(len(seeds)),
        noise=torch.cat([sampling.make_noise(dense, num_samples, seed=s, sample_shape=getattr(subject, "image_shape", None))
                         for s in seeds]),
        steps=steps, seed=seed, seeds=seeds, samples_per_stage=samples_per_stage, speed_threshold=speed_threshold,
        log_snr_weight=log_snr_weight, progress=progress)


@torch.no_grad()
def warmup(subject, model: nn.Module, label: int = 0) -> None:
    """A few tiny forwards spread over t = 999..0 (so every stage of a mosaic runs once).

    Keeps one-time costs (lazy imports, backend probing, kernel-config selection) out of the
    timed sampling run.
    """
    p = next(model.parameters())
    x = torch.zeros(2, *sampling.image_shape(model, getattr(subject, "image_shape", None)), device=p.device,
                    dtype=p.dtype)
    for t in torch.linspace(999, 0, 11).round().long():
        subject.warmup(model, x, t.expand(2).to(p.device), label)


# ----------------------------------------------------------------------------- measurements

def real_reference_images(num_samples: int, seed: int) -> torch.Tensor:
    """`num_samples` random real digits (seeded): the small-sample floor of the set-level metrics."""
    from mosaicdiff.zoo.data import load_digits_tensors

    images, _ = load_digits_tensors()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return images[idx]


def real_reference_fid(num_samples: int, seed: int) -> float:
    """FID of `num_samples` random real digits against all 1797: the small-sample floor at this N."""
    return quality.fid_to_real(real_reference_images(num_samples, seed))


def stage_info(mosaic) -> dict:
    """Stage names, ranges and sparsities of a `MosaicDiT`."""
    return {name: {"t_start": int(t0), "t_end": int(t1), "sparsity": float(sp)}
            for name, t0, t1, sp in mosaic.stage_ranges}


def step_mean_sparsity(mosaic, timesteps) -> float:
    """Sparsity averaged over the sampler's steps (each step uses its stage's sparsity)."""
    sp = [mosaic.stage_ranges[mosaic.stage_for(int(t))][3] for t in timesteps]
    return float(sum(sp) / len(sp))


def environment() -> dict:
    """Where the numbers were measured."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}


# ----------------------------------------------------------------------------- the report file

class ReportFile:
    """A JSON report (`data`) at `path`; `save` rewrites it atomically with the wall time so far."""

    def __init__(self, path: str | os.PathLike, data: dict):
        self.path = Path(path)
        self.data = data
        self._started = time.perf_counter()

    def save(self) -> None:
        self.data["wall_seconds"] = round(time.perf_counter() - self._started, 2)
        write_json_atomic(self.path, json_safe(self.data), indent=2)

    @contextlib.contextmanager
    def keeping_errors(self) -> Iterator[None]:
        """On any exception (Ctrl-C too): record it as ``error``, save what finished, re-raise."""
        try:
            yield
        except BaseException as exc:
            self.data["error"] = f"{type(exc).__name__}: {exc}"
            self.save()
            raise
