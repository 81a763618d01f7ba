"""The schedule search's fitness: fidelity to the dense model's images on a held-out set.

`HeldOutFidelity` fixes a small set of initial noises and class labels (from their own seed,
which should differ from the seeds a search result is evaluated on), samples the dense model on
them once, and scores a candidate model by the mean PSNR (dB) of its images to the dense ones
from the same noise and label. Sampling is deterministic (DDIM, eta = 0), so a candidate's score
is a function of its weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mosaicdiff.core import sampling
from mosaicdiff.eval import quality
from mosaicdiff.search.es import positive_int

__all__ = ["HeldOutFidelity", "PSNR_CEILING"]

#: Identical images have infinite PSNR; they count as this many dB (as in `mosaicdiff.app.experiment`).
PSNR_CEILING = 100.0


@dataclass
class HeldOutFidelity:
    """Mean PSNR to the dense model's samples on fixed noises and labels; build it with `from_dense`.

    Attributes:
        labels: `(n,)` class ids.
        noise: `(n, C, H, W)` initial noise.
        reference: `(n, C, H, W)` the dense model's samples from them.
        num_inference_steps: sampler steps (the search may use fewer than the evaluation).
        guidance_scale: classifier-free guidance scale.
        scheduler: the sampler (None: `mosaicdiff.core.sampling.default_scheduler`).
        clamp: clamp samples to [-1, 1] (pixel models; False for latents).
        seed: the seed of the noises and labels.
    """

    labels: torch.Tensor
    noise: torch.Tensor
    reference: torch.Tensor
    num_inference_steps: int
    guidance_scale: float
    scheduler: object | None
    clamp: bool
    seed: int

    @classmethod
    def from_dense(cls, dense: nn.Module, num_images: int = 32, *, seed: int = 1000, num_inference_steps: int = 50,
                   guidance_scale: float = 1.5, scheduler=None, clamp: bool = True,
                   progress: bool = False) -> HeldOutFidelity:
        """Draws `num_images` noises and uniform random labels from `seed` and samples `dense` on them.

        Raises:
            ValueError: `num_images` < 1, a bad step count or guidance scale (`mosaicdiff.core.sampling.sample`).
        """
        n = positive_int("fitness num_images", num_images, 1)
        seed = positive_int("fitness seed", seed, 0)
        steps = positive_int("fitness num_inference_steps", num_inference_steps, 1)
        num_classes = int(dense.config.num_embeds_ada_norm)
        generator = torch.Generator().manual_seed(seed)
        noise = sampling.make_noise(dense, n, generator=generator)
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        reference = sampling.sample(dense, labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                                    scheduler=scheduler, noise=noise, progress=progress, clamp=clamp)
        return cls(labels=labels, noise=noise, reference=reference, num_inference_steps=steps,
                   guidance_scale=float(guidance_scale), scheduler=scheduler, clamp=bool(clamp), seed=seed)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def images(self, model: nn.Module) -> torch.Tensor:
        """`model`'s samples from the held-out noises and labels."""
        return sampling.sample(model, self.labels, num_inference_steps=self.num_inference_steps,
                               guidance_scale=self.guidance_scale, scheduler=self.scheduler, noise=self.noise,
                               progress=False, clamp=self.clamp)

    def __call__(self, model: nn.Module) -> float:
        """Mean PSNR (dB, identical images counted as `PSNR_CEILING`) of `model`'s samples to the dense ones;
        NaN when the samples diverge to NaN/inf (`mosaicdiff.search.es.evolve` ranks it worst)."""
        try:
            images = self.images(model)
        except sampling.NonFiniteError:  # a candidate pruned too far: a fitness, not a failed search
            return float("nan")
        return float(quality.psnr(images, self.reference).clamp(max=PSNR_CEILING).mean())

    def describe(self) -> dict:
        """The settings, JSON-ready (for a search log)."""
        return {"images": len(self), "seed": self.seed, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "metric": "mean PSNR to dense (dB)",
                "psnr_ceiling": PSNR_CEILING}
