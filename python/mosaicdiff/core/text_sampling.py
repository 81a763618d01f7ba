"""Text-conditioned sampling with classifier-free guidance for U-Nets (SD 1.x/2.x style) and PixArt.

`sample_with_text` works for any `nn.Module` called like diffusers' ``UNet2DConditionModel``:
``model(x, timestep=t, encoder_hidden_states=(2B, S, T)).sample`` with a ``config`` holding
``in_channels`` and ``sample_size``. The dense diffusers U-Net and PixArt transformer and their
mosaics qualify. It is the pixel- or latent-space loop without a pipeline (no text encoder, no
VAE): the caller passes the prompt states, as the embedded digits models' label tokens
(`mosaicdiff.zoo.load_digits_label_tokens`) or precomputed text-encoder outputs. SDXL's added
conditions need its pipeline (``StableDiffusionXLPipeline(..., unet=mosaic)``).
"""

from __future__ import annotations

import torch
from torch import nn

from mosaicdiff.core.sampling import _param_like, guided_denoise

__all__ = ["sample_with_text"]


def _states(name: str, t, n: int | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"sample_with_text: {name} must be a float (B, S, T) tensor of text states, got {shape}")
    if n is not None and t.shape[0] not in (1, n):
        raise ValueError(f"sample_with_text: {name} has {t.shape[0]} rows, expected 1 or {n} (one per image)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"sample_with_text: {name} contain NaN/inf")
    return t


@torch.no_grad()
def sample_with_text(model: nn.Module, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None,
                     *, scheduler, num_inference_steps: int = 50, guidance_scale: float = 1.5,
                     noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     return_trajectory: bool = False, progress: bool = True, batch_size: int | None = None,
                     clamp: bool = True):
    """Sample images from text states with classifier-free guidance.

    At each step the batch is doubled: ``[x, x]`` with the states ``[prompt, negative]``; the
    guided noise is ``eps_u + g * (eps_c - eps_u)``. With ``guidance_scale == 1`` the negative
    branch is skipped.

    Args:
        model: a U-Net-like model (see the module docstring).
        prompt_embeds: `(B, S, T)` text states, one row per image.
        negative_prompt_embeds: `(B or 1, S, T)` states of the null prompt (default zeros).
        scheduler: a diffusers scheduler on the betas the model was trained with (e.g. DDIM on
            ``scaled_linear``, `mosaicdiff.zoo.digits_unet_scheduler`); copied per batch.
        The other arguments are those of `mosaicdiff.core.sampling.sample`.

    Returns:
        As `mosaicdiff.core.sampling.sample`.

    Raises:
        ValueError: states of the wrong shape, row count or with NaN/inf, and
            every error of `mosaicdiff.core.sampling.sample` (noise shape, steps, guidance, batch size).
    """
    prompt = _states("prompt_embeds", prompt_embeds, None)
    n = int(prompt.shape[0])
    if n == 0:
        raise ValueError("sample_with_text: prompt_embeds has no rows")
    negative = (torch.zeros_like(prompt[:1]) if negative_prompt_embeds is None
                else _states("negative_prompt_embeds", negative_prompt_embeds, n))
    if negative.shape[1:] != prompt.shape[1:]:
        raise ValueError(f"sample_with_text: negative_prompt_embeds rows are {tuple(negative.shape[1:])}, "
                         f"prompt_embeds rows {tuple(prompt.shape[1:])}")
    device, dtype = _param_like(model)
    prompt, negative = prompt.to(device, dtype), negative.to(device, dtype)

    def forward(x_in, t_in, rows: slice, cfg: bool) -> torch.Tensor:
        text = prompt[rows]
        if cfg:
            neg = negative[rows] if negative.shape[0] == n else negative.expand_as(text)
            text = torch.cat([text, neg])
        out = model(x_in.to(dtype), timestep=t_in, encoder_hidden_states=text).sample.float()
        return out[:, : x_in.shape[1]]

    return guided_denoise(model, forward, n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          scheduler=scheduler, noise=noise, generator=generator, return_trajectory=return_trajectory,
                          progress=progress, batch_size=batch_size, clamp=clamp)
