r"""diffusers schedulers as the method sees them: the forward noise process of the model, the
timesteps a sampler visits, and the default sampler (DDIM with DiT's training schedule).

Two forward processes (`noise_process` builds one from any scheduler):

- `DDPMProcess`: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` at integer timesteps
  ``t = 0..T-1`` (every diffusers scheduler with ``alphas_cumprod``: DDIM, DDPM, Euler, DPM-Solver, ...).
- `RectifiedFlowProcess`: ``x_t = (1 - s) x_0 + s eps`` with ``s = t / T`` at float timesteps
  ``t`` in ``[0, T]`` (``FlowMatchEulerDiscreteScheduler``: SD3 with a static ``shift``, Flux with
  a resolution-dependent ``mu``). The sampler visits ``s = shift(u)`` for uniformly spaced ``u``;
  `NoiseProcess.step_weight` is ``ds/du`` (docs/method.md, "Divide under flow matching").

Both give the method the same view: ``alphas_cumprod`` indexed by the integer model timestep (for
flow the variance-preserving equivalent ``(1 - s)^2 / ((1 - s)^2 + s^2)``, with the same SNR).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

__all__ = [
    "FLOW_SAMPLER_SIGMAS",
    "DDPMProcess",
    "NoiseProcess",
    "RectifiedFlowProcess",
    "default_scheduler",
    "flow_alphas_cumprod",
    "flow_shift_mu",
    "linear_alphas_cumprod",
    "noise_process",
    "sampler_timesteps",
    "scaled_linear_alphas_cumprod",
    "scheduler_alphas_cumprod",
]

#: How a flow pipeline spaces its sampler's sigmas before shifting: ``"scheduler"``: diffusers'
#: default grid of ``set_timesteps(n)`` (``StableDiffusion3Pipeline``); ``"flux"``:
#: ``np.linspace(1, 1/n, n)``, as ``FluxPipeline`` passes them.
FLOW_SAMPLER_SIGMAS = ("scheduler", "flux")


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


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> np.ndarray:
    """``cumprod(1 - beta)`` for ``beta = linspace(beta_start, beta_end, T)`` (DiT's schedule), float64."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> np.ndarray:
    """``cumprod(1 - beta)`` for ``beta = linspace(sqrt(b0), sqrt(b1), T)^2`` (SDXL's schedule), float64."""
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                        dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def flow_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """The variance-preserving equivalent of rectified flow, ``(1 - s)^2 / ((1 - s)^2 + s^2)`` at
    ``s = t / T`` for ``t = 0..T-1`` (float64): ``x_t / sqrt((1 - s)^2 + s^2)`` is a DDPM ``x_t``
    with this ``abar`` and the same SNR ``((1 - s) / s)^2``."""
    s = torch.arange(int(num_train_timesteps), dtype=torch.float64) / int(num_train_timesteps)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)


def flow_shift_mu(scheduler, image_seq_len: int) -> float:
    """Flux's resolution-dependent shift ``mu`` for `image_seq_len` latent tokens, as ``FluxPipeline``'s
    ``calculate_shift`` computes it from the scheduler's config: linear in the sequence length from
    ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``.

    ``FluxPipeline`` has ``image_seq_len = (height // 16) * (width // 16)`` for a `height` x `width`
    pixel image (4096 at 1024 px: ``mu = 1.15``).
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive integer (latent tokens), got {image_seq_len!r}")
    c = scheduler.config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return float(int(image_seq_len) * slope + base_shift - slope * base_len)


def _as_float64(t) -> np.ndarray:
    return torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1).numpy()


def _check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    return int(num_inference_steps)


class NoiseProcess:
    """The forward process ``x_t = a_t x_0 + b_t eps`` of a model's scheduler, as the method sees it.

    Attributes:
        kind (`str`): ``"ddpm"`` or ``"rectified_flow"``.
        scheduler: the diffusers scheduler it was built from (None for a bare ``alphas_cumprod``).
        num_train_timesteps (`int`): ``T``.
        timestep_end (`int`): exclusive end of the model timesteps a sampler visits (the stage
            ranges tile ``[0, timestep_end)``): ``T`` for DDPM, ``T + 1`` for flow (``t = T`` at
            ``s = 1``, the first Euler step).
        timestep_dtype (`torch.dtype`): the timesteps' dtype (int64 / float32).
    """

    kind = ""
    timestep_dtype = torch.int64

    def __init__(self, scheduler, num_train_timesteps: int):
        self.scheduler = scheduler
        self.num_train_timesteps = int(num_train_timesteps)

    @property
    def timestep_end(self) -> int:
        return self.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``abar_t`` (float64, CPU) at ``t = 0..T-1``; for flow the variance-preserving equivalent."""
        raise NotImplementedError

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, b_t)`` (float64, CPU) of ``x_t = a_t x_0 + b_t eps`` at model timesteps `t`."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` (float32, on `x0`'s device) of rows `x0` with noise `eps` at per-row timesteps `t` (CPU)."""
        raise NotImplementedError

    def draw_timesteps(self, t_start, t_end, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` timesteps (CPU) uniform over the model timesteps in ``[t_start, t_end)``."""
        raise NotImplementedError

    def step_weight(self) -> np.ndarray:
        """``ds/du`` at ``(t - 1/2) / T`` for ``t = 0..T-1``: how far the noise level moves per unit
        of the sampler's uniform axis ``u`` (1 for DDPM, whose samplers step uniformly in ``t``)."""
        return np.ones(self.num_train_timesteps)

    def sampler_axis(self, t) -> np.ndarray:
        """``T u`` at model timesteps `t`: their position on the sampler's uniform axis (DDPM: ``t``)."""
        return _as_float64(t)

    def sampler_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The model timesteps the scheduler visits for `num_inference_steps` steps (sampling order, CPU)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-ready description (for the mosaic's ``meta``)."""
        name = type(self.scheduler).__name__ if self.scheduler is not None else None
        return {"kind": self.kind, "scheduler": name, "num_train_timesteps": self.num_train_timesteps}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class DDPMProcess(NoiseProcess):
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` at integer ``t``; see `NoiseProcess`.

    Args:
        alphas_cumprod: ``abar_t`` for ``t = 0..T-1`` (array, tensor or list).
        scheduler (*optional*): the diffusers scheduler (its sampler's timesteps); default
            `default_scheduler` for `sampler_timesteps`.
    """

    kind = "ddpm"
    timestep_dtype = torch.int64

    def __init__(self, alphas_cumprod, scheduler=None):
        if isinstance(alphas_cumprod, np.ndarray):
            abar = torch.from_numpy(alphas_cumprod.astype(np.float64))
        else:
            abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if abar.dim() != 1 or abar.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(abar.shape)}")
        super().__init__(scheduler, abar.numel())
        self._abar = abar

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._abar

    def coefficients(self, t):
        a = self._abar[torch.as_tensor(t).to("cpu", torch.long)]
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0, eps, t):
        # in float32, term by term as stage_inputs always did (the DDPM draws are unchanged)
        a = self._abar[t.to("cpu")].to(torch.float32).view(-1, *[1] * (x0.dim() - 1))
        dev = x0.device
        return a.sqrt().to(dev) * x0.float() + (1 - a).sqrt().to(dev) * eps.to(dev)

    def draw_timesteps(self, t_start, t_end, n, generator=None):
        return torch.randint(int(t_start), int(t_end), (int(n),), generator=generator)

    def sampler_timesteps(self, num_inference_steps):
        n = _check_steps(num_inference_steps)
        base = self.scheduler
        sched = default_scheduler() if base is None else type(base).from_config(base.config)
        sched.set_timesteps(n)
        return torch.as_tensor(sched.timesteps).detach().to("cpu").round().long()


class RectifiedFlowProcess(NoiseProcess):
    """Rectified flow ``x_t = (1 - s) x_0 + s eps``, ``s = t / T``, velocity target ``eps - x_0``.

    The sampler's noise levels are ``s = shift(u)`` for uniformly spaced ``u`` in ``(0, 1]``, where
    ``shift`` is whatever the scheduler's ``set_timesteps`` applies (a static ``shift``, the dynamic
    ``mu``, ``shift_terminal``, Karras / exponential / beta sigmas): it is read off diffusers by
    calling ``set_timesteps`` on a copy with the ``T`` sigmas ``linspace(1, 1/T, T)``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (copied: the caller's is not touched).
        mu (`float`, *optional*): the dynamic shift; required with ``use_dynamic_shifting=True``
            unless `image_seq_len` is given, ignored otherwise (as diffusers ignores it).
        image_seq_len (`int`, *optional*): latent tokens per image; ``mu`` from it as
            ``FluxPipeline`` computes it (`flow_shift_mu`).
        sampler_sigmas (`str`, *optional*, defaults to ``"scheduler"``): how the pipeline spaces its
            sigmas, one of `FLOW_SAMPLER_SIGMAS` (``"flux"`` for ``FluxPipeline``).

    Raises:
        ValueError: naming `mu` when dynamic shifting has neither ``mu`` nor `image_seq_len`; on
            both given, a bad value, an unknown `sampler_sigmas` or ``invert_sigmas=True``.
    """

    kind = "rectified_flow"
    timestep_dtype = torch.float32

    def __init__(self, scheduler, mu: float | None = None, image_seq_len: int | None = None,
                 sampler_sigmas: str = "scheduler"):
        config = scheduler.config
        super().__init__(scheduler, config.get("num_train_timesteps", 1000))
        if config.get("invert_sigmas", False):
            raise ValueError("scheduler: a FlowMatchEulerDiscreteScheduler with invert_sigmas=True (Mochi) is not "
                             "supported; use invert_sigmas=False")
        if sampler_sigmas not in FLOW_SAMPLER_SIGMAS:
            raise ValueError(f"sampler_sigmas must be one of {FLOW_SAMPLER_SIGMAS}, got {sampler_sigmas!r}")
        if mu is not None and image_seq_len is not None:
            raise ValueError(f"pass mu or image_seq_len, not both (got mu={mu!r}, image_seq_len={image_seq_len!r})")
        if image_seq_len is not None:
            mu = flow_shift_mu(scheduler, image_seq_len)
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu)):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        self.dynamic = bool(config.get("use_dynamic_shifting", False))
        if self.dynamic and mu is None:
            raise ValueError("mu: this FlowMatchEulerDiscreteScheduler has use_dynamic_shifting=True, so its sigmas "
                             "depend on the image size; pass mu=... or image_seq_len=... (FluxPipeline: "
                             "(height // 16) * (width // 16) tokens)")
        self.mu = float(mu) if self.dynamic else None
        self.sampler_sigmas = sampler_sigmas
        self._sched = copy.deepcopy(scheduler)  # keeps a set_shift() made on the caller's instance
        self._grid: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def timestep_end(self) -> int:
        return self.num_train_timesteps + 1

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return flow_alphas_cumprod(self.num_train_timesteps)

    def coefficients(self, t):
        s = torch.as_tensor(t).detach().to("cpu", torch.float64) / self.num_train_timesteps
        return 1 - s, s

    def add_noise(self, x0, eps, t):
        s = (t.to("cpu", torch.float64) / self.num_train_timesteps).to(torch.float32)
        s = s.view(-1, *[1] * (x0.dim() - 1)).to(x0.device)
        return (1 - s) * x0.float() + s * eps.to(x0.device)

    def draw_timesteps(self, t_start, t_end, n, generator=None):
        # uniform over the stage's model timesteps: [t_start, t_end) within [0, T]
        hi = min(float(t_end), float(self.num_train_timesteps))
        u = torch.rand((int(n),), generator=generator, dtype=torch.float64)
        return (float(t_start) + (hi - float(t_start)) * u).to(torch.float32)

    def _set_timesteps(self, num_inference_steps: int, sigmas=None):
        sched = copy.deepcopy(self._sched)
        kwargs = {"mu": self.mu} if self.dynamic else {}
        if sigmas is None:
            sched.set_timesteps(num_inference_steps, **kwargs)
        else:
            sched.set_timesteps(sigmas=sigmas, **kwargs)
        return sched

    def sigma_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """``(u, s)``, float64 ascending: the scheduler's map at ``u = j / T``, ``j = 0..T``."""
        if self._grid is None:
            T = self.num_train_timesteps
            sched = self._set_timesteps(T, sigmas=np.linspace(1.0, 1.0 / T, T))
            s = sched.sigmas.detach().to("cpu", torch.float64).numpy()[::-1].copy()  # 0 (appended), ..., shift(1)
            if s.size != T + 1 or np.any(np.diff(s) <= 0):
                raise ValueError(f"scheduler: the sigmas of this {type(self.scheduler).__name__} are not a strictly "
                                 f"increasing map of (0, 1]; this configuration is not supported")
            self._grid = (np.arange(T + 1, dtype=np.float64) / T, s)
        return self._grid

    def step_weight(self):
        u, s = self.sigma_grid()
        slope = np.diff(s) / np.diff(u)  # ds/du on each grid interval, at its midpoint in s
        t = np.arange(self.num_train_timesteps, dtype=np.float64)
        return np.interp((t - 0.5).clip(min=0) / self.num_train_timesteps, (s[1:] + s[:-1]) / 2, slope)

    def sampler_axis(self, t):
        u, s = self.sigma_grid()
        return np.interp(_as_float64(t) / self.num_train_timesteps, s, u) * self.num_train_timesteps

    def sampler_timesteps(self, num_inference_steps):
        n = _check_steps(num_inference_steps)
        sigmas = np.linspace(1.0, 1.0 / n, n) if self.sampler_sigmas == "flux" else None
        return self._set_timesteps(n, sigmas).timesteps.detach().to("cpu", torch.float32)

    def describe(self) -> dict:
        return {**super().describe(), "shift": float(self._sched.shift), "use_dynamic_shifting": self.dynamic,
                "mu": self.mu, "sampler_sigmas": self.sampler_sigmas}


def _is_flow(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def noise_process(scheduler=None, *, mu: float | None = None, image_seq_len: int | None = None,
                  sampler_sigmas: str = "scheduler") -> NoiseProcess:
    """The forward process of a scheduler (or of a bare ``alphas_cumprod``).

    Args:
        scheduler (*optional*): a diffusers scheduler with ``alphas_cumprod`` (DDPM family), a
            ``FlowMatchEulerDiscreteScheduler`` (rectified flow), an ``alphas_cumprod`` array or
            tensor, or a `NoiseProcess` (returned as it is); default: DiT's linear schedule with
            `default_scheduler` as its sampler.
        mu, image_seq_len, sampler_sigmas: flow only, see `RectifiedFlowProcess`.

    Returns:
        `DDPMProcess` or `RectifiedFlowProcess`.

    Raises:
        ValueError: naming `scheduler` for a scheduler of another kind (a flow-matching one other
            than Euler, or one without ``alphas_cumprod``), naming `mu` for dynamic shifting
            without it, or flow options given for a DDPM scheduler or a built process.
        TypeError: if `scheduler` is neither a scheduler, an array nor a process.
    """
    flow_options = mu is not None or image_seq_len is not None or sampler_sigmas != "scheduler"
    if isinstance(scheduler, NoiseProcess):
        if flow_options:
            raise ValueError("mu, image_seq_len and sampler_sigmas apply when a process is built from a "
                             "scheduler; this scheduler is a NoiseProcess already")
        return scheduler
    if scheduler is None:
        return DDPMProcess(linear_alphas_cumprod())
    if isinstance(scheduler, (np.ndarray, torch.Tensor, list, tuple)):
        return DDPMProcess(scheduler)
    config = getattr(scheduler, "config", None)
    if config is not None and _is_flow(scheduler):
        return RectifiedFlowProcess(scheduler, mu=mu, image_seq_len=image_seq_len, sampler_sigmas=sampler_sigmas)
    name = type(scheduler).__name__
    if config is not None and (config.get("use_flow_sigmas", False) or "FlowMatch" in name
                               or config.get("prediction_type") == "flow_prediction"):
        raise ValueError(f"scheduler: {name} samples a flow-matching model, and only FlowMatchEulerDiscreteScheduler "
                         f"is supported for flow; pass one with the same shift")
    if getattr(scheduler, "alphas_cumprod", None) is None:
        if config is not None:
            raise ValueError(f"scheduler: {name} has no alphas_cumprod and is not a FlowMatchEulerDiscreteScheduler; "
                             f"pass a DDPM-family scheduler (DDIM, Euler, DPM-Solver, ...) or a flow-matching Euler one")
        raise TypeError(f"expected a diffusers scheduler with `alphas_cumprod` or a FlowMatchEulerDiscreteScheduler, "
                        f"got {name}")
    if flow_options:
        raise ValueError(f"mu, image_seq_len and sampler_sigmas apply to flow-matching schedulers, not to {name}")
    return DDPMProcess(scheduler.alphas_cumprod, scheduler)


def scheduler_alphas_cumprod(scheduler) -> torch.Tensor:
    """The training ``alphas_cumprod`` (float64, CPU, length T) of a diffusers scheduler or a
    `NoiseProcess`; for a flow-matching scheduler `flow_alphas_cumprod` (it does not depend on the
    shift, so a dynamic-shifting scheduler needs no ``mu`` here).

    Raises:
        TypeError: if `scheduler` is not a scheduler; ValueError: a scheduler of another kind.
    """
    if isinstance(scheduler, NoiseProcess):
        return scheduler.alphas_cumprod
    config = getattr(scheduler, "config", None)
    if config is not None and _is_flow(scheduler):
        return flow_alphas_cumprod(config.get("num_train_timesteps", 1000))
    if scheduler is None or isinstance(scheduler, (np.ndarray, torch.Tensor, list, tuple)):
        raise TypeError(f"expected a diffusers scheduler with `alphas_cumprod`, got {type(scheduler).__name__}")
    return noise_process(scheduler).alphas_cumprod


def sampler_timesteps(num_inference_steps: int, scheduler=None, *, mu: float | None = None,
                      image_seq_len: int | None = None, sampler_sigmas: str = "scheduler") -> torch.Tensor:
    """The model timesteps a scheduler visits for `num_inference_steps` steps.

    The scheduler is copied, so the caller's instance is not modified.

    Args:
        num_inference_steps (`int`): sampling steps.
        scheduler (*optional*): a diffusers scheduler or a `NoiseProcess`; defaults to
            `default_scheduler`.
        mu, image_seq_len, sampler_sigmas: flow-matching schedulers only, see `RectifiedFlowProcess`.

    Returns:
        CPU tensor in sampling order (high to low): int64 for DDPM schedulers (``0..T-1``), float32
        for flow matching (``T * sigma``: 1000.0, 966.7, ... for 30 unshifted steps).

    Raises:
        ValueError: if `num_inference_steps` is not a positive integer; see `noise_process`.
    """
    _check_steps(num_inference_steps)
    process = noise_process(scheduler, mu=mu, image_seq_len=image_seq_len, sampler_sigmas=sampler_sigmas)
    return process.sampler_timesteps(num_inference_steps)
