"""Class-conditional sampling with classifier-free guidance for DiT-like models.

`sample` works for any `nn.Module` called like diffusers' ``DiTTransformer2DModel``:
``model(x, timestep=(2B,) long tensor, class_labels=(2B,) long tensor).sample`` with a
``config`` holding ``in_channels``, ``out_channels``, ``sample_size`` and ``num_embeds_ada_norm``
(the null class index used for guidance). The dense diffusers model and `MosaicDiT` both qualify.

Fixed-noise comparisons: with the same seed (or the same `noise` tensor) and the default
deterministic DDIM sampler (eta = 0), every method starts from the same initial noise, so the
images of a dense and a pruned model can be compared pixel by pixel (PSNR).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import NamedTuple

import torch
from torch import nn

from mosaicdiff.core.schedulers import default_scheduler

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "Trajectory", "check_guidance_scale", "default_scheduler", "guided_denoise",
           "image_shape", "make_noise", "sample"]


class NonFiniteError(ValueError):
    """Sampling produced NaN/inf images (an overflowing guidance scale or model, NaN weights).

    Attributes:
        step (`int` or None): the first sampling step (1-based) whose output was not finite; None
            when the decoder (a VAE) made finite latents NaN/inf.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Trajectory(NamedTuple):
    """The model inputs of one sampling run.

    Attributes:
        xs: one `(B, C, H, W)` CPU float32 tensor per sampling step: the ``x_t`` fed to the model
            at that step (high noise first).
        timesteps: `(num_steps,)` int64 training timesteps of the steps, in sampling order.
    """

    xs: list[torch.Tensor]
    timesteps: torch.Tensor


def _cfg(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"sample: model {type(model).__name__} has no `config` (expected a DiT-like model)")
    value = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
    if value is None:
        raise TypeError(f"sample: model config lacks {name!r} (expected a DiT-like model config)")
    return value


def _param_like(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def make_noise(model: nn.Module, num: int, seed: int | None = None,
               generator: torch.Generator | None = None, sample_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Initial noise `(num, C, H, W)` float32 on CPU.

    Drawn from a CPU generator by default (``seed``), which makes the noise of a seed identical
    on every device and for every method. A generator on another device (e.g.
    ``torch.Generator("cuda")``) draws on its device; the noise is then moved to the CPU.
    ``(C, H, W)`` is `sample_shape`, or the model config's ``in_channels`` and ``sample_size``.
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return _noise((num, *image_shape(model, sample_shape)), generator)


def image_shape(model: nn.Module, sample_shape: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one sample: `sample_shape` if given, else the model config's ``in_channels``
    and ``sample_size`` (a model whose config does not say it, as Flux's, needs `sample_shape`)."""
    if sample_shape is not None:
        return tuple(int(v) for v in sample_shape)
    size = int(_cfg(model, "sample_size"))
    return int(_cfg(model, "in_channels")), size, size


def _noise(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device).cpu()


@torch.no_grad()
def sample(
    model: nn.Module,
    labels,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.5,
    scheduler=None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    clamp: bool = True,
):
    """Sample class-conditional images with classifier-free guidance.

    At each step the batch is doubled: ``[x, x]`` with labels ``[y, null]`` (null =
    ``model.config.num_embeds_ada_norm``) and the (2B,) int64 timestep; the guided noise is
    ``eps = eps_u + g * (eps_c - eps_u)``. A learned-sigma model (``out_channels ==
    2 * in_channels``) has its variance channels dropped (DDIM does not use them). With
    ``guidance_scale == 1`` the unconditional branch is skipped (same result, half the work).

    Args:
        model: a DiT-like model (see the module docstring), e.g. ``DiTTransformer2DModel`` or
            `MosaicDiT`. Its device and dtype are used for the forward passes.
        labels: `(B,)` class ids (ints or a tensor).
        num_inference_steps: sampler steps (`scheduler.set_timesteps`).
        guidance_scale: CFG scale ``g`` (1 = conditional only). The default 1.5 suits the
            embedded digits model (see `mosaicdiff.app.demo`).
        scheduler: a diffusers scheduler (epsilon prediction); default `default_scheduler()`. It is
            copied per batch, so stateful multistep schedulers work and the caller's is untouched.
        noise: `(B, C, H, W)` initial noise; default drawn on the CPU from `generator`
            (see `make_noise`). Pass the same noise (or seed) for fixed-noise comparisons.
        generator: generator for the initial noise (see `make_noise`; any device) and for
            stochastic schedulers.
        return_trajectory: also return the `Trajectory` of model inputs.
        progress: show a tqdm bar over the sampling steps.
        batch_size: images per sampling run (default all at once).
        clamp: clamp the result to [-1, 1] (pixels). False for latents, which a VAE decodes
            (`mosaicdiff.core.sharded_sampling`): their range is wider.

    Returns:
        `(B, C, H, W)` float32 CPU images clamped to [-1, 1] (unclamped with ``clamp=False``); with
        `return_trajectory`, the tuple ``(images, Trajectory)``.

    Raises:
        ValueError: on bad labels, noise shape, step count, batch size or a NaN/inf guidance scale.
        NonFiniteError: (a ValueError) the images became NaN/inf; the message names the step.
        TypeError: if `model` has no DiT-like config.
    """
    in_ch = int(_cfg(model, "in_channels"))
    out_ch = int(_cfg(model, "out_channels") or in_ch)
    null_class = int(_cfg(model, "num_embeds_ada_norm"))
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"sample: out_channels must be in_channels ({in_ch}) or 2*in_channels "
                         f"(learned sigma), got {out_ch}")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.is_floating_point():
        raise TypeError(f"sample: labels must be integers, got {labels.dtype}")
    labels = labels.long().cpu()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= null_class:
        raise ValueError(f"sample: labels must be non-empty class ids in [0, {null_class}), "
                         f"got {labels.tolist()[:16]}")
    device, dtype = _param_like(model)

    def forward(x_in, t_in, rows: slice, cfg: bool) -> torch.Tensor:
        y = labels[rows].to(device)
        y_in = torch.cat([y, torch.full_like(y, null_class)]) if cfg else y
        return model(x_in.to(dtype), timestep=t_in, class_labels=y_in).sample.float()[:, :in_ch]

    return guided_denoise(model, forward, labels.numel(), num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, scheduler=scheduler, noise=noise, generator=generator,
                          return_trajectory=return_trajectory, progress=progress, batch_size=batch_size, clamp=clamp)


def guided_denoise(model: nn.Module, forward, n: int, *, num_inference_steps: int, guidance_scale: float,
                   scheduler=None, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   return_trajectory: bool = False, progress: bool = True, batch_size: int | None = None,
                   clamp: bool = True, sample_shape: tuple[int, int, int] | None = None):
    """The CFG sampling loop shared by every conditioning (class labels here, text in `text_sampling`).

    Args:
        model: the denoiser (its ``config`` gives the sample shape, its parameters device and dtype).
        forward: ``forward(x_in, t_in, rows, cfg) -> eps`` for the images ``rows`` (a slice) of the
            current batch: ``x_in`` is ``[x, x]`` (conditional, then unconditional) when ``cfg``,
            else ``x``; ``t_in`` the (len(x_in),) timesteps (int64, or float32 for a scheduler with
            float timesteps: flow matching's ``1000 * sigma``); returns float32 predictions shaped
            like ``x_in`` (noise, or velocity for a flow-matching scheduler: ``scheduler.step`` reads them).
        n: number of images.
        sample_shape: ``(C, H, W)`` of an image, for a model whose config does not say it (Flux's
            packed tokens); default ``config.in_channels`` and ``config.sample_size``.
        The other arguments are those of `sample`.

    Returns:
        As `sample`.

    Raises:
        NonFiniteError: ``x`` became NaN/inf (checked on the device after every step and read once
            per batch, when the images go to the CPU anyway); clamping would otherwise save black images.
    """
    from tqdm.auto import tqdm

    if int(num_inference_steps) < 1:
        raise ValueError(f"sample: num_inference_steps must be >= 1, got {num_inference_steps}")
    shape = image_shape(model, sample_shape)
    if noise is None:
        noise = _noise((n, *shape), generator)
    elif tuple(noise.shape) != (n, *shape):
        raise ValueError(f"sample: noise must be {(n, *shape)}, got {tuple(noise.shape)}")
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"sample: batch_size must be >= 1, got {batch_size}")
    base = scheduler if scheduler is not None else default_scheduler()
    device, _ = _param_like(model)
    g = check_guidance_scale(guidance_scale)
    use_cfg = g != 1.0
    # Timesteps: a CPU tensor for models that read the stage on the host (no device sync per
    # step), else a contiguous device tensor (the same form every step: no torch.compile
    # recompiles between a timing loop and a sampling run).
    t_device = torch.device("cpu") if getattr(model, "accepts_host_timestep", False) else device

    outputs, traj_chunks, step_ts = [], [], None
    num_chunks = (n + bs - 1) // bs
    bar = tqdm(total=int(num_inference_steps) * num_chunks, desc="sampling", disable=not progress,
               leave=False)
    for i in range(0, n, bs):
        sched = copy.deepcopy(base)
        sched.set_timesteps(int(num_inference_steps))
        step_kwargs = {"generator": generator} if _takes_generator(sched) else {}
        rows = slice(i, min(i + bs, n))
        b = rows.stop - rows.start
        # flow-matching schedulers have float timesteps and neither an initial sigma nor input scaling
        x = noise[rows].to(device=device, dtype=torch.float32) * float(getattr(sched, "init_noise_sigma", 1.0))
        float_t = sched.timesteps.is_floating_point()
        xs = []
        first_bad = torch.zeros((), dtype=torch.long, device=x.device)  # 1-based step; 0: all finite so far
        for k, t in enumerate(sched.timesteps, 1):
            if return_trajectory:
                xs.append(x.detach().float().cpu())
            x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
            t_in = (torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=t_device) if float_t
                    else torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=t_device))
            eps = forward(x_in, t_in, rows, use_cfg)
            if use_cfg:
                eps_c, eps_u = eps[:b], eps[b:]
                eps = eps_u + g * (eps_c - eps_u)
            x = sched.step(eps, t, x, return_dict=False, **step_kwargs)[0]
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(x).all(), k, first_bad)
            bar.update(1)
        _check_finite(int(first_bad), sched.timesteps, g)
        outputs.append((x.float().clamp(-1, 1) if clamp else x.float()).cpu())
        traj_chunks.append(xs)
        step_ts = sched.timesteps.detach().cpu().float() if float_t else sched.timesteps.detach().cpu().long()
    bar.close()
    images = torch.cat(outputs)
    if not return_trajectory:
        return images
    xs = [torch.cat([chunk[k] for chunk in traj_chunks]) for k in range(len(traj_chunks[0]))]
    return images, Trajectory(xs=xs, timesteps=step_ts)


def _check_finite(first_bad: int, timesteps: torch.Tensor, guidance_scale: float) -> None:
    if first_bad:
        raise NonFiniteError(
            f"sample: the images became NaN/inf at sampling step {first_bad} of {len(timesteps)} (timestep "
            f"{int(timesteps[first_bad - 1])}): the model or guidance_scale={guidance_scale:g} overflows; check the "
            f"weights for NaN/inf and use a guidance scale of about 1 to 10", first_bad)


def check_guidance_scale(value, who: str = "sample") -> float:
    """The CFG scale as a finite float: a NaN or inf scale would silently turn every image black.

    Raises:
        ValueError: `value` is not a finite real number (bools and strings included), naming `who`.
    """
    try:
        g = None if isinstance(value, (bool, str)) else float(value)  # numpy and 0-d tensor scalars too
    except (TypeError, ValueError):
        g = None
    if g is None or not math.isfinite(g):
        raise ValueError(f"{who}: guidance_scale must be a finite number (1 = no guidance, DiT uses "
                         f"about 1.5 to 4), got {value!r}")
    return g


def _takes_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters
