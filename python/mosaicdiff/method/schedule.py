r"""Divide: the learning-speed score along the noise axis, stage boundaries, sparsity allocation.

Closed form (docs/method.md): with ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and
``r = ||x_0||^2 / d``, the expected per-dimension distance of the noisy latent to the clean one is::

    E[MSE(t)] = (1 - sqrt(abar_t))^2 * r + (1 - abar_t)
    Grad(t)   = E[MSE(t)] - E[MSE(t - 1)]            # with E[MSE(-1)] = 0 (x_{-1} = x_0)
    Score(t)  = norm(Grad)(t) + lambda * norm(ln SNR)(t)  # norm: min-max to [0, 1] over t

The middle ("fast-learning") stage is the contiguous run of t around ``argmax Score`` where
``Score(t) >= M * max Score``; it is ``[t_low, t_high)``. In code the paper's ``M`` is
``speed_threshold`` and ``lambda`` is ``log_snr_weight`` (defaults `DEFAULT_SPEED_THRESHOLD`,
`DEFAULT_LOG_SNR_WEIGHT`). Early is ``t >= t_high`` (high noise),
late is ``t < t_low``. A timestep equal to a boundary belongs to the stage *above* it, so with
boundaries 600/200 the DDIM-50 timesteps 980, 960, ..., 0 split 20 / 20 / 10.

Rectified flow (SD3, Flux; docs/method.md, "Divide under flow matching"): pass a
`mosaicdiff.core.schedulers.NoiseProcess` (``noise_process(scheduler, mu=...)``) or the flow scheduler
where ``alphas_cumprod`` is asked for. With ``x_t = (1 - s) x_0 + s eps``, ``s = t / T``, and the
sampler's noise levels ``s = shift(u)`` for uniformly spaced ``u``::

    E[MSE(t)] = (1 + r) s^2                           # x_t - x_0 = s v, v = eps - x_0
    Grad(t)   = (E[MSE(t)] - E[MSE(t - 1)]) * ds/du   # per sampler step, not per unit of t

so the shift (SD3's ``shift``, Flux's resolution-dependent ``mu``) moves the boundaries. A flow
process's model timesteps run over ``[0, T]`` (``t = T`` at ``s = 1``), so its stages tile
``[0, T + 1)`` (`NoiseProcess.timestep_end`).

Curves are returned as float64 numpy arrays indexed by the training timestep ``t = 0..T-1``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mosaicdiff.core.schedulers import (
    NoiseProcess,
    linear_alphas_cumprod,
    noise_process,
    scaled_linear_alphas_cumprod,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOG_SNR_WEIGHT",
    "DEFAULT_SPEED_THRESHOLD",
    "allocate_sparsity",
    "curve_agreement",
    "empirical_curve",
    "expected_mse",
    "learning_grad",
    "linear_alphas_cumprod",
    "log_snr",
    "normalized_score",
    "scaled_linear_alphas_cumprod",
    "score",
    "stage_boundaries",
    "stage_mean_scores",
    "stages_from_boundaries",
    "steps_per_stage",
]

#: The paper's ``M``: the middle stage is where the score is at least this fraction of its peak.
DEFAULT_SPEED_THRESHOLD = 0.55
#: The paper's ``lambda``: weight of the normalised log-SNR term of the score (0: learning speed only).
DEFAULT_LOG_SNR_WEIGHT = 0.0

Stage = tuple[str, int, int]  # (name, t_start inclusive, t_end exclusive)


def _as_abar(alphas_cumprod) -> np.ndarray:
    if isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64).numpy()
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if abar.ndim != 1 or abar.size < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {abar.shape}")
    if not np.all((abar > 0) & (abar <= 1)):
        raise ValueError(
            f"alphas_cumprod must lie in (0, 1], got min {abar.min():.3g} and max {abar.max():.3g}"
        )
    return abar


def _source(alphas_cumprod) -> np.ndarray | NoiseProcess:
    """A DDPM schedule as its ``abar`` array (the original formulas), a flow process as itself."""
    if alphas_cumprod is None or isinstance(alphas_cumprod, (np.ndarray, torch.Tensor, list, tuple)):
        return _as_abar(alphas_cumprod)
    process = noise_process(alphas_cumprod)  # a scheduler or a process
    return _as_abar(process.alphas_cumprod) if process.kind == "ddpm" else process


def _gaussian_path_mse(process: NoiseProcess, t, x0_sq_norm: float) -> np.ndarray:
    """``E||x_t - x_0||^2 / d = (1 - a_t)^2 r + b_t^2`` for ``x_t = a_t x_0 + b_t eps`` (flow: ``(1 + r) s^2``)."""
    a, b = (c.numpy() for c in process.coefficients(t))
    return (1.0 - a) ** 2 * float(x0_sq_norm) + b ** 2


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    if span <= 0:
        return np.zeros_like(x)
    return (x - x.min()) / span


def expected_mse(alphas_cumprod, x0_sq_norm: float = 1.0) -> np.ndarray:
    """``E[MSE(t)] = E||x_t - x_0||^2 / d``: ``(1 - sqrt(abar_t))^2 * r + (1 - abar_t)`` for DDPM,
    ``(1 + r) (t / T)^2`` for rectified flow.

    Args:
        alphas_cumprod (`np.ndarray` or `torch.Tensor`): ``abar_t`` for t = 0..T-1; or a
            `NoiseProcess` or scheduler (flow matching: `mosaicdiff.core.schedulers.noise_process`).
        x0_sq_norm (`float`, *optional*, defaults to 1.0): ``r = ||x_0||^2 / d`` of the data.

    Returns:
        `np.ndarray` (T,) float64.
    """
    src = _source(alphas_cumprod)
    if x0_sq_norm < 0:
        raise ValueError(f"x0_sq_norm must be >= 0, got {x0_sq_norm}")
    if isinstance(src, NoiseProcess):
        return _gaussian_path_mse(src, np.arange(src.num_train_timesteps), x0_sq_norm)
    return (1.0 - np.sqrt(src)) ** 2 * float(x0_sq_norm) + (1.0 - src)


def learning_grad(alphas_cumprod, x0_sq_norm: float = 1.0) -> np.ndarray:
    """Per-step change of `expected_mse`: ``Grad(t) = E[MSE(t)] - E[MSE(t-1)]``, ``E[MSE(-1)] = 0``;
    for rectified flow times the sampler's ``ds/du`` (`NoiseProcess.step_weight`): the change per
    sampler step, which the shift slows down at high noise.

    Returns:
        `np.ndarray` (T,) float64, positive for any decreasing ``abar``.
    """
    src = _source(alphas_cumprod)
    grad = np.diff(expected_mse(src, x0_sq_norm), prepend=0.0)
    return grad * src.step_weight() if isinstance(src, NoiseProcess) else grad


def log_snr(alphas_cumprod) -> np.ndarray:
    """``ln SNR(t) = ln(abar_t / (1 - abar_t))`` (abar clipped below 1 to keep it finite)."""
    src = _source(alphas_cumprod)
    abar = np.minimum(_as_abar(src.alphas_cumprod) if isinstance(src, NoiseProcess) else src, 1.0 - 1e-12)
    return np.log(abar) - np.log1p(-abar)


def score(alphas_cumprod, log_snr_weight: float = DEFAULT_LOG_SNR_WEIGHT, x0_sq_norm: float = 1.0) -> np.ndarray:
    """``Score(t) = norm(Grad)(t) + lambda * norm(ln SNR)(t)``, both terms min-max normalized to [0, 1].

    Normalizing first makes `log_snr_weight` scale-free (our decision; the paper does not say).

    Args:
        alphas_cumprod: ``abar_t`` for t = 0..T-1.
        log_snr_weight (`float`, *optional*, defaults to 0.0): the paper's ``lambda``, weight of the
            log-SNR term.
        x0_sq_norm (`float`, *optional*, defaults to 1.0): ``||x_0||^2 / d``.

    Returns:
        `np.ndarray` (T,) float64.
    """
    grad = _minmax(learning_grad(alphas_cumprod, x0_sq_norm))
    if log_snr_weight == 0:
        return grad
    return grad + float(log_snr_weight) * _minmax(log_snr(alphas_cumprod))


def normalized_score(alphas_cumprod, log_snr_weight: float = DEFAULT_LOG_SNR_WEIGHT,
                     x0_sq_norm: float = 1.0) -> np.ndarray:
    """`score` min-max normalized to [0, 1] (what the sparsity allocation averages per stage)."""
    return _minmax(score(alphas_cumprod, log_snr_weight, x0_sq_norm))


def stage_boundaries(alphas_cumprod, speed_threshold: float = DEFAULT_SPEED_THRESHOLD,
                     log_snr_weight: float = DEFAULT_LOG_SNR_WEIGHT, x0_sq_norm: float = 1.0) -> tuple[int, int]:
    """The middle (fast-learning) stage ``[t_low, t_high)`` from the closed-form score.

    The middle stage is the contiguous run of timesteps containing ``argmax Score`` on which
    ``Score(t) >= M * max Score`` (``M`` = `speed_threshold`; if the threshold set has several runs,
    the others are ignored and logged). Early is ``t >= t_high``, late is ``t < t_low``. For DiT's linear schedule with
    ``M = 0.55, lambda = 0, r = 1`` this gives ``(111, 576)``; the paper's summaries quote bands of
    about ``(200, 600]`` (pass explicit boundaries to use those).

    Args:
        alphas_cumprod: ``abar_t`` for t = 0..T-1.
        speed_threshold (`float`, *optional*, defaults to 0.55): the paper's ``M``, the threshold
            relative to the peak, in (0, 1].
        log_snr_weight (`float`, *optional*, defaults to 0.0): the paper's ``lambda``, the
            log-SNR weight, see `score`.
        x0_sq_norm (`float`, *optional*, defaults to 1.0): ``||x_0||^2 / d``.

    For rectified flow (a `NoiseProcess` or flow scheduler), the score is per sampler step, so the
    boundaries depend on the shift: with ``M = 0.55`` SD3's ``shift=3`` gives ``(152, 968)``; with
    ``shift < 2.8`` the run reaches ``s = 1`` and ``t_high = T + 1`` (no slow high-noise stage).

    Returns:
        `(t_low, t_high)` ints with ``0 <= t_low < t_high <= T`` (``<= T + 1`` for flow).

    Raises:
        ValueError: if `speed_threshold` is not in (0, 1] or the score has no positive peak.
    """
    if not 0 < speed_threshold <= 1:
        raise ValueError(f"speed_threshold (the paper's M) must be in (0, 1], got {speed_threshold}")
    src = _source(alphas_cumprod)
    s = score(src, log_snr_weight, x0_sq_norm)
    peak = int(np.argmax(s))
    if s[peak] <= 0:
        raise ValueError(f"the score has no positive peak (max {s[peak]:.3g}); pass explicit boundaries")
    above = s >= speed_threshold * s[peak]
    lo = peak
    while lo > 0 and above[lo - 1]:
        lo -= 1
    hi = peak + 1
    while hi < s.size and above[hi]:
        hi += 1
    if int(above.sum()) != hi - lo:
        logger.info("score >= speed_threshold*max on %d timesteps outside the run [%d, %d) around the peak; ignored",
                    int(above.sum()) - (hi - lo), lo, hi)
    if hi == s.size and isinstance(src, NoiseProcess):
        hi = src.timestep_end  # the run reaches s = 1 (t = T), beyond the curve: no early stage
    return lo, hi


def stages_from_boundaries(t_low: int, t_high: int, T: int = 1000) -> list[Stage]:
    """The three stages ``[(name, t_start, t_end)]`` in sampling order, ``t_end`` exclusive.

    Returns:
        ``[("early", t_high, T), ("middle", t_low, t_high), ("late", 0, t_low)]``.

    Raises:
        ValueError: unless ``0 < t_low < t_high < T`` (every stage non-empty), or on a boundary
            that is not an integer: floats (even ``200.0``) and bools are refused, so that
            ``200.9`` is never silently cut to 200; numpy and 0-d tensor integers are accepted.
    """
    t_low, t_high, T = (_timestep_int(n, v) for n, v in (("t_low", t_low), ("t_high", t_high), ("T", T)))
    if not 0 < t_low < t_high < T:
        raise ValueError(f"stage boundaries must satisfy 0 < t_low < t_high < T={T}, "
                         f"got t_low={t_low}, t_high={t_high}")
    return [("early", t_high, T), ("middle", t_low, t_high), ("late", 0, t_low)]


def _timestep_int(name: str, value) -> int:
    """``value`` as an int timestep; floats and bools are refused rather than rounded."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)  # int, numpy integer, integer 0-d tensor
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer timestep, got {value!r} ({type(value).__name__})")


def steps_per_stage(timesteps, stages: Sequence[Stage]) -> dict[str, int]:
    """Counts the sampler's timesteps falling in each stage (``t_start <= t < t_end``).

    Args:
        timesteps: the sampler's timesteps (e.g. ``scheduler.timesteps``), any order.
        stages: ``[(name, t_start, t_end)]`` as from `stages_from_boundaries`.

    Returns:
        `dict` name -> number of steps, in the order of `stages`.

    Raises:
        ValueError: if a timestep lies in no stage or in more than one.
    """
    ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
    counts = {}
    hits = np.zeros(ts.shape, dtype=np.int64)
    for name, t_start, t_end in stages:
        inside = (ts >= t_start) & (ts < t_end)
        counts[name] = int(inside.sum())
        hits += inside
    if np.any(hits != 1):
        bad = ts[hits != 1]
        raise ValueError(
            f"timesteps {bad[:8].tolist()} fall in {hits[hits != 1][:8].tolist()} stages each "
            f"(expected exactly 1); stages: {list(stages)}"
        )
    return counts


def stage_mean_scores(stages: Sequence[Stage], norm_score) -> list[float]:
    """Mean of a [0, 1] score over each stage's ``[t_start, t_end)`` (e.g. `normalized_score`)."""
    s = np.asarray(norm_score, dtype=np.float64)
    out = []
    for name, t_start, t_end in stages:
        if not 0 <= t_start < t_end <= s.size:
            raise ValueError(f"stage {name!r} [{t_start}, {t_end}) is outside the score's t range [0, {s.size})")
        out.append(float(s[t_start:t_end].mean()))
    return out


def allocate_sparsity(target_mean: float, stage_scores: Sequence[float],
                      steps_per_stage: Mapping[str, int] | Sequence[int], s_max: float = 0.9,
                      explicit: Sequence[float] | None = None) -> list[float]:
    """Per-stage sparsities whose step-weighted mean equals `target_mean`.

    ``s_i = c * (1 - score_i)`` with ``c`` chosen so that ``sum_i n_i s_i / sum_i n_i`` equals
    `target_mean` (``n_i`` = sampling steps in stage i), then clipped to ``[0, s_max]``: stages
    that hit ``s_max`` are fixed there and the rest of the budget is spread again over the
    others, proportionally to ``1 - score_i`` (uniformly if those weights are all zero).
    The stage with the highest mean score (the middle one) gets the least sparsity.

    Args:
        target_mean (`float`): target sparsity averaged over sampling steps, in ``[0, s_max]``.
        stage_scores (`Sequence[float]`): mean normalized score of each stage, in [0, 1].
        steps_per_stage: steps of each stage, as a sequence in the order of `stage_scores` or a
            name -> count mapping in that order (`steps_per_stage`).
        s_max (`float`, *optional*, defaults to 0.9): upper clip, in (0, 1).
        explicit (`Sequence[float]`, *optional*): per-stage sparsities chosen by the user; they
            are validated and returned as given (their mean need not equal `target_mean`).

    Returns:
        `list[float]`, one sparsity per stage.

    Raises:
        ValueError: on mismatched lengths, values out of range, no sampling steps at all, or a
            target that cannot be reached under `s_max`.
    """
    scores = np.asarray(list(stage_scores), dtype=np.float64)
    steps = np.asarray(list(steps_per_stage.values()) if isinstance(steps_per_stage, Mapping)
                       else list(steps_per_stage), dtype=np.float64)
    if scores.shape != steps.shape or scores.size == 0:
        raise ValueError(f"stage_scores and steps_per_stage must have the same non-zero length, "
                         f"got {scores.size} and {steps.size}")
    if explicit is not None:
        exp = [float(v) for v in explicit]
        if len(exp) != scores.size:
            raise ValueError(f"expected {scores.size} explicit stage sparsities, got {len(exp)}")
        for v in exp:
            if not 0 <= v < 1:
                raise ValueError(f"stage sparsities must be in [0, 1), got {exp}")
        return exp
    if not 0 < s_max < 1:
        raise ValueError(f"s_max must be in (0, 1), got {s_max}")
    if not 0 <= target_mean <= s_max:
        raise ValueError(f"target_mean must be in [0, s_max={s_max}], got {target_mean}")
    if np.any(steps < 0) or steps.sum() <= 0:
        raise ValueError(f"steps_per_stage must be >= 0 with a positive total, got {steps.tolist()}")
    if np.any(~np.isfinite(scores)) or np.any(scores < -1e-12) or np.any(scores > 1 + 1e-12):
        raise ValueError(f"stage_scores must be in [0, 1], got {scores.tolist()}")

    weight = np.clip(1.0 - scores, 0.0, 1.0)
    if weight.max() <= 0:
        weight = np.ones_like(weight)
    budget = float(target_mean) * steps.sum()  # sum_i n_i s_i must equal this
    fixed = np.zeros(scores.size, dtype=bool)
    s = np.zeros(scores.size)
    for _ in range(scores.size + 1):
        free = ~fixed
        rest = budget - s_max * steps[fixed].sum()
        w = weight[free]
        denom = float((steps[free] * w).sum())
        if denom <= 0:  # the free stages have no steps or zero weight: spread uniformly
            w = np.ones_like(w)
            denom = float(steps[free].sum())
        s[free] = (rest / denom * w) if denom > 0 else 0.0
        over = free & (s > s_max)
        if not over.any():
            break
        s[over] = s_max
        fixed |= over
    s = np.clip(s, 0.0, s_max)
    mean = float((steps * s).sum() / steps.sum())
    if abs(mean - target_mean) > 1e-9:
        raise ValueError(f"cannot reach target_mean={target_mean} with s_max={s_max} and steps "
                         f"{steps.tolist()} (best mean {mean:.6f})")
    return [float(v) for v in s]


def empirical_curve(trajectory: Sequence[torch.Tensor], x0_final: torch.Tensor,
                    timesteps=None) -> tuple[np.ndarray, np.ndarray]:
    """The measured counterpart of `expected_mse` / `learning_grad` along one sampling run.

    Args:
        trajectory (`Sequence[torch.Tensor]`): the model inputs ``x_t`` of each sampling step, in
            sampling order (high noise first), each shaped like `x0_final`.
        x0_final (`torch.Tensor`): the sample the run ended with.
        timesteps (*optional*): the steps' training timesteps; when given, the rate is per unit
            of t (comparable with `learning_grad`), else per sampling step.

    Returns:
        `(mse, rate)`: float64 arrays (n_steps,). ``mse[i] = mean((x_{t_i} - x0_final)^2)``;
        ``rate[i] = (mse[i] - mse[i+1]) / (t_i - t_{i+1})`` with ``mse[n] = 0`` at ``t_n = -1``
        (the final sample), or without the division when `timesteps` is None.

    Raises:
        ValueError: on an empty trajectory, shape mismatches or a wrong number of timesteps.
    """
    if len(trajectory) == 0:
        raise ValueError("trajectory is empty")
    ref = x0_final.detach().to(torch.float64)
    mse = []
    for i, x in enumerate(trajectory):
        if x.shape != x0_final.shape:
            raise ValueError(f"trajectory[{i}] has shape {tuple(x.shape)}, expected {tuple(x0_final.shape)}")
        mse.append(float(((x.detach().to(ref.device, torch.float64) - ref) ** 2).mean()))
    mse = np.asarray(mse)
    rate = mse - np.append(mse[1:], 0.0)
    if timesteps is not None:
        ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
        if ts.size != mse.size:
            raise ValueError(f"expected {mse.size} timesteps, got {ts.size}")
        dt = ts - np.append(ts[1:], -1.0)
        if np.any(dt <= 0):
            raise ValueError(f"timesteps must be strictly decreasing and >= 0, got {ts.tolist()}")
        rate = rate / dt
    return mse, rate


def curve_agreement(alphas_cumprod, timesteps, measured_mse, x0_sq_norm: float = 1.0) -> dict[str, float | int]:
    """QF3: Pearson correlations between the closed-form curves and the ones measured along a run.

    Both are taken at the sampler's steps: ``pearson_mse`` between `expected_mse` and the measured
    MSE of ``x_t`` to the final sample (`empirical_curve`); ``pearson_rate`` between the learning
    speeds, each as the same finite difference between consecutive steps,
    ``(mse(t_i) - mse(t_{i+1})) / (t_i - t_{i+1})`` (the last step, to the final sample, is left out
    as in the stage plot).

    Args:
        alphas_cumprod: ``abar_t`` for t = 0..T-1, or a `NoiseProcess` / scheduler (rectified flow:
            the closed form ``(1 + r) s^2`` at the steps' float timesteps, the rates per unit of
            the sampler's uniform axis ``T u``, `NoiseProcess.sampler_axis`).
        timesteps: the steps' training timesteps, in sampling order (strictly decreasing).
        measured_mse: `(n_steps,)` measured MSE at those steps.
        x0_sq_norm: ``||x_0||^2 / d`` for the closed form.

    Returns:
        ``{"pearson_mse", "pearson_rate", "steps"}``.

    Raises:
        ValueError: fewer than 3 steps, mismatched lengths, or timesteps not strictly decreasing.
    """
    src = _source(alphas_cumprod)
    raw = torch.as_tensor(timesteps).detach().cpu()
    ts = np.asarray(raw.numpy(), dtype=np.float64 if isinstance(src, NoiseProcess) else np.int64).reshape(-1)
    measured = np.asarray(measured_mse, dtype=np.float64).reshape(-1)
    if ts.size != measured.size or ts.size < 3:
        raise ValueError(f"curve_agreement: need >= 3 steps with one MSE each, got {ts.size} timesteps and "
                         f"{measured.size} values")
    if np.any(ts[:-1] - ts[1:] <= 0):
        raise ValueError(f"curve_agreement: timesteps must be strictly decreasing, got {ts.tolist()}")
    if isinstance(src, NoiseProcess):
        if ts[-1] < 0 or ts[0] > src.num_train_timesteps:
            raise ValueError(f"curve_agreement: flow timesteps must lie in [0, {src.num_train_timesteps}], "
                             f"got {ts.tolist()}")
        closed = _gaussian_path_mse(src, ts, x0_sq_norm)
        axis = src.sampler_axis(ts)
    else:
        closed = expected_mse(src, x0_sq_norm)[ts]
        axis = ts.astype(np.float64)
    dt = axis[:-1] - axis[1:]

    def rate(m):
        return (m[:-1] - m[1:]) / dt

    return {"pearson_mse": float(np.corrcoef(closed, measured)[0, 1]),
            "pearson_rate": float(np.corrcoef(rate(closed), rate(measured))[0, 1]), "steps": int(ts.size)}
