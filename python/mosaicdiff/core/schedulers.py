"""diffusers schedulers as the method sees them: the training ``alphas_cumprod`` and the timesteps
a sampler visits, plus the default sampler (DDIM with DiT's training schedule)."""

from __future__ import annotations

import torch

__all__ = ["default_scheduler", "sampler_timesteps", "scheduler_alphas_cumprod"]


def default_scheduler():
    """DDIM with DiT's training schedule (linear betas 1e-4..0.02, T = 1000), eta = 0 at `step`.

    ``clip_sample=False``, as in DiT. Clipping the predicted ``x_0`` to [-1, 1] looks natural in
    pixel space, but diffusers' DDIM then mixes the clipped ``x_0`` with the unclipped noise
    direction; measured on the embedded digits model (100 samples, g = 1, a mid-training
    checkpoint) clipping raised digits-FID from 152 to 188 at 20 steps, from 153 to 257 at 50
    and from 153 to 568 at 200 steps (class accuracy 0.70 -> 0.16), while without clipping FID
    was flat in the step count. ``timestep_spacing="leading"`` with ``set_alpha_to_one=True``
    gives DiT's timesteps 980, 960, ..., 0 for 50 steps and a clean final ``x_0``. The final
    images are clamped to [-1, 1] by `mosaicdiff.core.sampling.sample`.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                         steps_offset=0, timestep_spacing="leading", prediction_type="epsilon")


def scheduler_alphas_cumprod(scheduler) -> torch.Tensor:
    """The training ``alphas_cumprod`` (float64, length T) of a diffusers scheduler.

    Raises:
        TypeError: if the scheduler has no ``alphas_cumprod`` (e.g. flow-matching schedulers).
    """
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(
            f"expected a diffusers scheduler with `alphas_cumprod`, got {type(scheduler).__name__}"
        )
    return torch.as_tensor(abar).detach().to("cpu", torch.float64)


def sampler_timesteps(num_inference_steps: int, scheduler=None) -> torch.Tensor:
    """The training timesteps (0..T-1) a scheduler visits for `num_inference_steps` steps.

    The scheduler is copied (``from_config``) so the caller's instance is not modified.

    Args:
        num_inference_steps (`int`): sampling steps.
        scheduler (*optional*): a diffusers scheduler; defaults to `default_scheduler`.

    Returns:
        `torch.LongTensor` of timesteps in sampling order (high to low), on CPU.

    Raises:
        ValueError: if `num_inference_steps` is not a positive integer.
    """
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    sched = default_scheduler() if scheduler is None else type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(int(num_inference_steps))
    return torch.as_tensor(sched.timesteps).detach().to("cpu").round().long()
