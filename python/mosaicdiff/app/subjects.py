"""The embedded models `mosaicdiff demo` and `mosaicdiff eval` measure, behind one interface.

A subject says how to load its dense model, build its calibration data from the digits, sample it
(class labels for the DiT; label tokens as text states for the U-Net and PixArt) and warm it up. Everything
else of an experiment (stages, pruning, metrics, the report) is the same for all.

- ``digits-dit``: the class-conditional DiT (`mosaicdiff.zoo.load_digits_dit`), DDIM on linear betas;
- ``digits-unet``: the text-conditioned U-Net (`mosaicdiff.zoo.load_digits_unet`) whose prompt is
  the digit's row of learned label tokens, DDIM on ``scaled_linear`` betas;
- ``digits-pixart``: the text-conditioned DiT in PixArt's layout (`mosaicdiff.zoo.load_digits_pixart`),
  prompted by its own label tokens, DPM-Solver++ on linear betas;
- ``digits-mmdit``: the rectified-flow MMDiT in Flux's layout (`mosaicdiff.zoo.load_digits_mmdit`),
  prompted by its label conditioning, Euler flow matching without guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mosaicdiff import zoo
from mosaicdiff.core import sampling
from mosaicdiff.zoo.data import NUM_CLASSES

__all__ = ["SUBJECTS", "DigitsDiT", "DigitsMMDiT", "DigitsPixArt", "DigitsUNet", "subject_named"]


@dataclass
class DigitsDiT:
    """The embedded class-conditional digits DiT (or a user's DiT shaped like it)."""

    name = "digits-dit"
    title = "digits DiT"
    guidance_scale = 1.5  # the FID optimum of its guidance sweep (docs/results.md, "Demo settings")
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
class _TextDigits:
    """A text-conditioned digits model: a digit's prompt is its row of the model's label tokens."""

    tokens: torch.Tensor | None = None  # (NUM_CLASSES + 1, S, T); loaded with the model
    tokens_of = "unet"  # whose label-token table (`zoo.load_digits_label_tokens`)

    def _tokens(self) -> torch.Tensor:
        if self.tokens is None:
            self.tokens = zoo.load_digits_label_tokens(model=self.tokens_of)
        return self.tokens

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
        model(x, timestep=t, encoder_hidden_states=table[[label, NUM_CLASSES]])


@dataclass
class DigitsUNet(_TextDigits):
    """The embedded text-conditioned digits U-Net; a digit's prompt is its row of label tokens."""

    name = "digits-unet"
    title = "digits U-Net"
    guidance_scale = 1.5
    sampler = "DDIM eta=0 (scaled_linear betas, no x0 clipping)"
    # kept GEGLU widths: multiples of 8; 64 would round the 128 channels of the width-32 blocks
    # to 0 or 64 pruned and make the realized sparsities differ from the targets by method
    align = 8

    def load(self) -> nn.Module:
        self.tokens = zoo.load_digits_label_tokens()
        return zoo.load_digits_unet()

    def calibration(self, dense: nn.Module):
        from mosaicdiff.app.inputs import digits_calibration
        from mosaicdiff.calibrate import TextCalibration

        digits = digits_calibration(NUM_CLASSES)
        table = self._tokens()
        return TextCalibration(latents=digits.x0, prompt_embeds=table[digits.labels],
                               negative_prompt_embeds=table[NUM_CLASSES:NUM_CLASSES + 1])

    def scheduler(self):
        return zoo.digits_unet_scheduler()


@dataclass
class DigitsPixArt(_TextDigits):
    """The embedded digits PixArt (adaLN-single, cross-attention to the digit's label tokens)."""

    name = "digits-pixart"
    title = "digits PixArt"
    # its prompts act through cross-attention only: class accuracy 0.83 at 1.5, 0.95 at 3 (docs/results.md)
    guidance_scale = 3.0
    sampler = "DPM-Solver++ 2M (linear betas)"
    align = 64  # kept MLP widths: multiples of 64 of the 768 channels, as the digits DiT's
    tokens_of = "pixart"

    def load(self) -> nn.Module:
        self.tokens = zoo.load_digits_label_tokens(model="pixart")
        return zoo.load_digits_pixart()

    def calibration(self, dense: nn.Module):
        from mosaicdiff.app.inputs import digits_calibration
        from mosaicdiff.calibrate import ConditionedCalibration

        digits = digits_calibration(NUM_CLASSES)
        table = self._tokens()
        return ConditionedCalibration(digits.x0, {"encoder_hidden_states": table[digits.labels]},
                                      {"encoder_hidden_states": table[NUM_CLASSES:NUM_CLASSES + 1]})

    def scheduler(self):
        return zoo.digits_pixart_scheduler()


@dataclass
class DigitsMMDiT:
    """The embedded rectified-flow MMDiT in Flux.1's layout (double- and single-stream blocks, RoPE),
    prompted by its label conditioning; guidance-free like Flux-schnell: one forward per step."""

    name = "digits-mmdit"
    title = "digits MMDiT (Flux layout)"
    guidance_scale = 1.0  # trained without a null prompt: there is no unconditional branch to guide with
    sampler = "Euler flow matching (shift 3, as SD3)"
    align = 16  # kept MLP widths: multiples of 16 of the 256 channels
    image_shape = (1, 16, 16)  # the model reads these pixels packed 2x2 into 64 tokens (zoo.train_mmdit.pack)

    def load(self) -> nn.Module:
        return zoo.load_digits_mmdit()

    def _conditioning(self, labels, like: torch.Tensor) -> dict:
        return zoo.load_digits_mmdit_conditioning(labels, device=like.device, torch_dtype=like.dtype)

    def calibration(self, dense: nn.Module):
        from mosaicdiff.app.inputs import digits_calibration
        from mosaicdiff.calibrate import ConditionedCalibration

        digits = digits_calibration(NUM_CLASSES)
        cond = zoo.load_digits_mmdit_conditioning(digits.labels)
        # unpacked images (the Flux adapter packs them) and the prompt; the positions are the
        # pipeline's defaults (zeros for the text, the 8x8 grid), which the adapter fills in
        return ConditionedCalibration(digits.x0, {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")},
                                      cfg=False)

    def scheduler(self):
        return zoo.digits_mmdit_scheduler()

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, *, steps: int,
               guidance_scale: float, progress: bool, return_trajectory: bool = False):
        from mosaicdiff.zoo.train_mmdit import pack, unpack

        if guidance_scale != 1.0:
            raise ValueError(f"{self.name} has no unconditional branch (trained without a null prompt): "
                             f"guidance_scale must be 1.0, got {guidance_scale}")
        p = next(model.parameters())
        conditioning = self._conditioning(labels, p)

        def forward(x_in, t_in, rows: slice, cfg: bool) -> torch.Tensor:
            cond = {k: v[rows] if k in ("encoder_hidden_states", "pooled_projections") else v
                    for k, v in conditioning.items()}
            v = model(hidden_states=pack(x_in.to(p.dtype)), timestep=t_in.to(p.dtype) / 1000, **cond,
                      return_dict=False)[0]
            return unpack(v.float())

        return sampling.guided_denoise(model, forward, len(labels), num_inference_steps=steps, guidance_scale=1.0,
                                       scheduler=self.scheduler(), noise=noise, progress=progress,
                                       return_trajectory=return_trajectory, sample_shape=self.image_shape)

    @torch.no_grad()
    def warmup(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, label: int) -> None:
        from mosaicdiff.zoo.train_mmdit import pack

        model(hidden_states=pack(x), timestep=t.to(x.dtype) / 1000, **self._conditioning([label] * len(x), x))


#: The subjects by name (the demo's and eval's ``--model`` accepts these names).
SUBJECTS = {s.name: s for s in (DigitsDiT, DigitsUNet, DigitsPixArt, DigitsMMDiT)}


def subject_named(name: str):
    """A new subject of that name; ValueError naming the choices otherwise."""
    if name not in SUBJECTS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {sorted(SUBJECTS)}")
    return SUBJECTS[name]()
