"""The searched schedule as a method of `mosaicdiff demo` and `mosaicdiff eval` (``--methods ...,searched``).

`mosaicdiff.search.search.search_schedule` (ten uniform stages, per-stage sparsities by a
(mu + lambda) evolution strategy, Diff-ES style) with the settings of its stored comparison
(`scripts/compare_schedule_search.py`, docs/data/schedule_search_stronger_dit.json): a fitness of
mean PSNR to the dense samples on 32 held-out noises and labels of their own seed (1000, apart
from the evaluation seeds), sampled with the subject's own sampler at 25 steps. The fitness goes
through the subject (`mosaicdiff.app.subjects`), so any embedded model can be searched, the
text-conditioned U-Net included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mosaicdiff.app.inputs import sample_labels
from mosaicdiff.core import sampling
from mosaicdiff.core.schedulers import sampler_timesteps
from mosaicdiff.eval import quality
from mosaicdiff.method.calibrate import resolve_alphas_cumprod
from mosaicdiff.method.schedule import steps_per_stage
from mosaicdiff.search.es import EvolutionConfig
from mosaicdiff.search.fitness import PSNR_CEILING
from mosaicdiff.search.search import DEFAULT_NUM_STAGES, search_schedule, uniform_stages
from mosaicdiff.zoo.data import NUM_CLASSES

__all__ = ["FITNESS_IMAGES", "FITNESS_SEED", "FITNESS_STEPS", "SubjectFidelity", "searched_mosaic", "stage_count"]

FITNESS_IMAGES = 32
FITNESS_SEED = 1000
FITNESS_STEPS = 25
#: The budget of the stored comparison (docs/data/schedule_search_stronger_dit.json).
EVOLUTION = dict(population=4, offspring=10, generations=15, max_moves=3, patience=6, seed=0)


@dataclass
class SubjectFidelity:
    """Mean PSNR of a model's samples to the dense model's on fixed held-out noises and labels,
    sampled by an embedded subject's own sampler (labels cycle 0..9, as the demo's)."""

    subject: Any
    labels: torch.Tensor
    noise: torch.Tensor
    reference: torch.Tensor
    steps: int
    guidance_scale: float
    seed: int

    @classmethod
    def from_dense(cls, subject, dense: nn.Module, *, guidance_scale: float, images: int | None = None,
                   seed: int | None = None, steps: int | None = None) -> SubjectFidelity:
        """Samples the dense model once on the held-out set (default: the module's settings)."""
        images = FITNESS_IMAGES if images is None else int(images)
        seed = FITNESS_SEED if seed is None else int(seed)
        steps = FITNESS_STEPS if steps is None else int(steps)
        labels = sample_labels(images, NUM_CLASSES)
        noise = sampling.make_noise(dense, images, seed=seed, sample_shape=getattr(subject, "image_shape", None))
        reference = subject.sample(dense, labels, noise, steps=steps, guidance_scale=guidance_scale, progress=False)
        return cls(subject, labels, noise, reference, int(steps), float(guidance_scale), int(seed))

    def __call__(self, model: nn.Module) -> float:
        try:
            images = self.subject.sample(model, self.labels, self.noise, steps=self.steps,
                                         guidance_scale=self.guidance_scale, progress=False)
        except sampling.NonFiniteError:  # pruned too far: the search ranks NaN worst
            return float("nan")
        return float(quality.psnr(images, self.reference).clamp(max=PSNR_CEILING).mean())

    def describe(self) -> dict:
        return {"images": int(self.labels.numel()), "seed": self.seed, "num_inference_steps": self.steps,
                "guidance_scale": self.guidance_scale, "metric": "mean PSNR to dense (dB)",
                "psnr_ceiling": PSNR_CEILING, "sampler": self.subject.sampler}


def stage_count(scheduler, steps: int) -> int:
    """The most t-uniform stages, up to the search's ten, each holding a step of the `steps`-step
    sampler (a short run, e.g. DDIM-6, leaves some of ten or even six stages without one)."""
    abar = resolve_alphas_cumprod(scheduler)
    timesteps = sampler_timesteps(steps, scheduler)
    for k in range(min(DEFAULT_NUM_STAGES, int(steps)), 1, -1):
        if all(n > 0 for n in steps_per_stage(timesteps, uniform_stages(k, abar.numel())).values()):
            return k
    return 1


def searched_mosaic(run, sparsity: float, guidance_scale: float,
                    evolution: EvolutionConfig | None = None) -> tuple[nn.Module, dict]:
    """The searched schedule of an `mosaicdiff.app.experiment.Experiment` at `sparsity`;
    returns ``(mosaic, search log)`` (the log's ``seconds`` include the fitness's dense samples)."""
    fitness = SubjectFidelity.from_dense(run.subject, run.dense, guidance_scale=guidance_scale)
    return search_schedule(run.dense, run.calibration, sparsity, scheduler=run.subject.scheduler(),
                           num_stages=stage_count(run.subject.scheduler(), run.steps),
                           evolution=evolution if evolution is not None else EvolutionConfig(**EVOLUTION),
                           num_inference_steps=run.steps, fitness=fitness, guidance_scale=guidance_scale,
                           samples_per_stage=run.samples_per_stage, seed=run.seed, align=run.subject.align,
                           progress=run.progress)
