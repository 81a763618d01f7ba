"""The embedded models `mosaicdiff demo` and `mosaicdiff eval` measure, behind one interface.

A subject says how to load its dense model, build its calibration data from the digits, sample it
(class labels for the DiT; label tokens as text states for the U-Net) and warm it up. Everything
else of an experiment (stages, pruning, metrics, the report) is the same for both.

- ``digits-dit``: the class-conditional DiT (`mosaicdiff.zoo.load_digits_dit`), DDIM on linear betas;
- ``digits-unet``: the text-conditioned U-Net (`mosaicdiff.zoo.load_digits_unet`) whose prompt is
  the digit's row of learned label tokens, DDIM on ``scaled_linear`` betas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mosaicdiff import zoo
from mosaicdiff.core import sampling
from mosaicdiff.zoo.data import NUM_CLASSES

__all__ = ["SUBJECTS", "DigitsDiT", "DigitsUNet", "subject_named"]


@dataclass
class DigitsDiT:
    """The embedded class-conditional digits DiT (or a user's DiT shaped like it)."""

    name = "digits-dit"
    title = "digits DiT"
    sampler = "DDIM eta=0 (linear betas, no x0 clipping)"
    align = 64  # kept MLP widths: multiples of 64 of the 768 channels (what a GPU wants)

    def load(self) -> nn.Module:
        return zoo.load_digits_dit()

    def calibration(self, dense: nn.Module):
        from mosaicdiff.app.inputs import digits_calibration

        return digits_calibration(int(dense.config.num_embeds_ada_norm))

    def scheduler(self):
        return sampling.default_scheduler()

    def sample(self, model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, *, steps: int,
               guidance_scale: float, progress: bool, return_trajectory: bool = False):
        return sampling.sample(model, labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                               noise=noise, scheduler=self.scheduler(), progress=progress,
                               return_trajectory=return_trajectory)

    @torch.no_grad()
    def warmup(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, label: int) -> None:
        null = int(model.config.num_embeds_ada_norm)
        model(x, timestep=t, class_labels=torch.tensor([label, null], device=x.device))


@dataclass
class DigitsUNet:
    """The embedded text-conditioned digits U-Net; a digit's prompt is its row of label tokens."""

    name = "digits-unet"
    title = "digits U-Net"
    sampler = "DDIM eta=0 (scaled_linear betas, no x0 clipping)"
    # kept GEGLU widths: multiples of 8; 64 would round the 128 channels of the width-32 blocks
    # to 0 or 64 pruned and make the realized sparsities differ from the targets by method
    align = 8
    tokens: torch.Tensor | None = None  # (NUM_CLASSES + 1, S, T); loaded with the model

    def load(self) -> nn.Module:
        self.tokens = zoo.load_digits_label_tokens()
        return zoo.load_digits_unet()

    def _tokens(self) -> torch.Tensor:
        if self.tokens is None:
            self.tokens = zoo.load_digits_label_tokens()
        return self.tokens

    def calibration(self, dense: nn.Module):
        from mosaicdiff.app.inputs import digits_calibration
        from mosaicdiff.method.calibrate import TextCalibration

        digits = digits_calibration(NUM_CLASSES)
        table = self._tokens()
        return TextCalibration(latents=digits.x0, prompt_embeds=table[digits.labels],
                               negative_prompt_embeds=table[NUM_CLASSES:NUM_CLASSES + 1])

    def scheduler(self):
        return zoo.digits_unet_scheduler()

    def sample(self, model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, *, steps: int,
               guidance_scale: float, progress: bool, return_trajectory: bool = False):
        from mosaicdiff.core.text_sampling import sample_with_text

        table = self._tokens()
        return sample_with_text(model, table[labels], table[NUM_CLASSES:NUM_CLASSES + 1], scheduler=self.scheduler(),
                                num_inference_steps=steps, guidance_scale=guidance_scale, noise=noise,
                                progress=progress, return_trajectory=return_trajectory)

    @torch.no_grad()
    def warmup(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, label: int) -> None:
        table = self._tokens().to(x.device, x.dtype)
        model(x, t, encoder_hidden_states=table[[label, NUM_CLASSES]])


#: The subjects by name (the demo's and eval's ``--model`` accepts these names).
SUBJECTS = {s.name: s for s in (DigitsDiT, DigitsUNet)}


def subject_named(name: str):
    """A new subject of that name; ValueError naming the choices otherwise."""
    if name not in SUBJECTS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {sorted(SUBJECTS)}")
    return SUBJECTS[name]()
