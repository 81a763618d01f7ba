"""Divide, without a model: the stages of a method (boundaries, steps per stage, sparsities)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mosaicdiff.core.schedulers import noise_process, sampler_timesteps
from mosaicdiff.method import schedule, step_allocation

__all__ = ["DEFAULT_MAX_EXCESS", "METHODS", "SINGLE_STAGE_NAME", "STEPWISE_S_MAX", "check_fraction", "default_s_max",
           "plan_stages"]

#: Stage layouts of `mosaicdiff.prune`.
METHODS = ("mosaic", "stepwise", "uniform", "magnitude", "random")
#: Name of the single stage of the one-stage methods.
SINGLE_STAGE_NAME = "all"


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


#: How far above the target mean a stage's allocated sparsity may go by default (see `default_s_max`).
DEFAULT_MAX_EXCESS = 0.1


#: The allocation cap of ``method="stepwise"``: its allocation is fitted to the model, so it is
#: only kept from pruning a stage to almost nothing (0.8 keeps 1 of 6 heads of the digits DiT).
STEPWISE_S_MAX = 0.8


def default_s_max(target_sparsity: float) -> float:
    """The default allocation cap: ``min(0.9, target + 0.1)``.

    The raw allocation ``s_i ∝ 1 - mean score`` is extreme when the middle stage's score is near
    1 and the others' near 0: at target 0.5 on the embedded digits DiT it gave early 0.77 /
    middle 0.16 / late 0.67, kept 1 of 6 heads early, and lost to uniform pruning (FID 112.7 vs
    97.8, 200 samples). Capping the stages at target + 0.1 (0.6 / 0.36 / 0.6) gave FID 92.1,
    better than uniform, with the same realized sparsity; at target 0.3 the cap 0.4 gave 94.8 vs
    uniform 95.4 (docs/results.md). Pass `s_max` to use another cap.
    """
    return min(0.9, float(target_sparsity) + DEFAULT_MAX_EXCESS)


def plan_stages(target_sparsity: float = 0.5, *, method: str = "mosaic", boundaries=None,
                stage_sparsities=None, alphas_cumprod=None, timesteps=None,
                speed_threshold: float = schedule.DEFAULT_SPEED_THRESHOLD,
                log_snr_weight: float = schedule.DEFAULT_LOG_SNR_WEIGHT, x0_sq_norm: float = 1.0,
                s_max: float | None = None, num_stages: int = step_allocation.DEFAULT_NUM_STAGES,
                sensitivities=None, exchange_rate: float = step_allocation.DEFAULT_EXCHANGE_RATE,
                ) -> tuple[list[tuple[str, int, int, float]], dict[str, Any]]:
    """The stages (name, t_start, t_end, sparsity) of a method, without touching a model.

    Args:
        target_sparsity (`float`): mean sparsity over the sampler's steps, in [0, 1).
        method (`str`): one of `METHODS`: ``"stepwise"`` cuts the steps into `num_stages` stages of
            equal step counts and allocates from `sensitivities`
            (`mosaicdiff.method.step_allocation`).
        boundaries (`tuple[int, int]`, *optional*): ``(t_low, t_high)`` of the middle stage;
            default: `schedule.stage_boundaries` (``method="mosaic"`` only).
        stage_sparsities (*optional*): explicit sparsities: three values (early, middle, late)
            or a name -> value mapping for ``"mosaic"``, one per stage for ``"stepwise"``, one value
            for the others.
        alphas_cumprod (*optional*): training ``abar``, a scheduler or a
            `mosaicdiff.core.schedulers.NoiseProcess` (rectified flow: ``noise_process(scheduler,
            mu=...)``, whose stages tile ``[0, T + 1)``); default DiT's linear schedule.
        timesteps (*optional*): the sampler's timesteps (for the step counts); default
            `mosaicdiff.core.schedulers.sampler_timesteps(50)` (for flow the process's 50 steps).
        speed_threshold (`float`), log_snr_weight (`float`), x0_sq_norm (`float`): see
            `mosaicdiff.method.schedule.stage_boundaries`.
        s_max (`float`, *optional*): upper clip of the allocation; default
            `default_s_max(target_sparsity)` (``"stepwise"``: `STEPWISE_S_MAX`).
        num_stages (`int`, *optional*): ``"stepwise"`` only: stages of equal step counts
            (`mosaicdiff.method.step_allocation.equal_step_stages`).
        sensitivities (*optional*): ``"stepwise"`` only: the probed error of each stage
            (`mosaicdiff.method.step_allocation.probe_errors`), needed unless `stage_sparsities` is given.
        exchange_rate (`float`, *optional*): ``"stepwise"`` only: ``a`` of
            `mosaicdiff.method.step_allocation.allocate_exponential`.

    Returns:
        `(stages, info)`: stages in sampling order and a JSON-ready dict (boundaries, steps per
        stage, stage scores, step-weighted mean sparsity).

    Raises:
        ValueError: on an unknown method or invalid sparsities / boundaries.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    target = check_fraction("target_sparsity", target_sparsity)
    if s_max is not None and (isinstance(s_max, bool) or not isinstance(s_max, (int, float))
                              or not 0 < s_max < 1):
        raise ValueError(f"s_max must be a number in (0, 1), got {s_max!r}")
    capped = s_max is None
    if s_max is None:
        s_max = STEPWISE_S_MAX if method == "stepwise" else default_s_max(target)
    s_max = float(s_max)
    process = noise_process(alphas_cumprod)
    # DDPM: the abar array (the original code path); flow: the process (score per sampler step)
    curve = process.alphas_cumprod.numpy() if process.kind == "ddpm" else process
    T = process.timestep_end  # the stages tile [0, T): T + 1 for flow (t = T at s = 1)
    if timesteps is None:
        timesteps = sampler_timesteps(50) if process.kind == "ddpm" else process.sampler_timesteps(50)
    info: dict[str, Any] = {}
    if method == "mosaic":
        if boundaries is None:
            bounds = schedule.stage_boundaries(curve, speed_threshold, log_snr_weight, x0_sq_norm)
            if not 0 < bounds[0] < bounds[1] < T:
                side = "t = 0 (no slow low-noise stage)" if bounds[0] <= 0 else \
                    f"the top t = {process.num_train_timesteps} (no slow high-noise stage)"
                hint = " (rectified flow needs a shift above about 2.8 at M = 0.55)" if process.kind != "ddpm" else ""
                raise ValueError(
                    f"the closed-form score of {process} stays above speed_threshold={speed_threshold:g} times its "
                    f"peak up to {side}, so the middle stage [{bounds[0]}, {bounds[1]}) leaves no room for three "
                    f"stages{hint}; pass boundaries=(t_low, t_high) or a larger speed_threshold")
        else:
            if isinstance(boundaries, (str, bytes)) or not hasattr(boundaries, "__len__") or len(boundaries) != 2:
                raise ValueError(f"boundaries must be a pair of integer timesteps (t_low, t_high), "
                                 f"got {boundaries!r}")
            bounds = (boundaries[0], boundaries[1])
        stages = schedule.stages_from_boundaries(*bounds, T=T)
        bounds = (int(bounds[0]), int(bounds[1]))
        steps = schedule.steps_per_stage(timesteps, stages)
        norm = schedule.normalized_score(curve, log_snr_weight, x0_sq_norm)
        scores = schedule.stage_mean_scores([(n, a, min(b, norm.size)) for n, a, b in stages], norm)
        explicit = None
        if stage_sparsities is not None:
            if isinstance(stage_sparsities, Mapping):
                names = [s[0] for s in stages]
                if set(stage_sparsities) != set(names):
                    raise ValueError(f"stage_sparsities must name the stages {names}, got {sorted(stage_sparsities)}")
                explicit = [stage_sparsities[n] for n in names]
            else:
                explicit = list(stage_sparsities)
            explicit = [check_fraction("stage sparsity", v) for v in explicit]
        elif target > s_max:  # said here in the public names (allocate_sparsity says target_mean)
            how = "the default cap min(0.9, target_sparsity + 0.1)" if capped else "passed"
            raise ValueError(
                f"target_sparsity={target:g} is above s_max={s_max:g} ({how}), the largest sparsity "
                f"the allocation may give a stage; use target_sparsity <= {s_max:g}, pass s_max with "
                f"target_sparsity <= s_max < 1, or pass stage_sparsities")
        sparsities = schedule.allocate_sparsity(target, scores, steps, s_max=s_max, explicit=explicit)
        info.update(boundaries=list(bounds), stage_scores=[float(s) for s in scores])
    elif method == "stepwise":
        stages = step_allocation.equal_step_stages(timesteps, num_stages, T)
        steps = schedule.steps_per_stage(timesteps, stages)
        if stage_sparsities is not None:
            vals = list(stage_sparsities.values()) if isinstance(stage_sparsities, Mapping) else list(stage_sparsities)
            if len(vals) != len(stages):
                raise ValueError(f"method='stepwise' with num_stages={num_stages} needs {len(stages)} stage "
                                 f"sparsities, got {len(vals)}")
            sparsities = [check_fraction("stage sparsity", v) for v in vals]
        else:
            if sensitivities is None or len(sensitivities) != len(stages):
                raise ValueError(f"method='stepwise' needs one probed sensitivity per stage ({len(stages)}) or "
                                 f"explicit stage_sparsities, got {sensitivities!r}")
            if target > s_max:
                raise ValueError(f"target_sparsity={target:g} is above s_max={s_max:g}, the largest sparsity the "
                                 f"allocation may give a stage; use target_sparsity <= {s_max:g} or pass s_max")
            sparsities = step_allocation.allocate_exponential(
                list(sensitivities), [steps[n] for n, _, _ in stages], target, rate=exchange_rate, s_max=s_max)
            info.update(stage_scores=[float(v) for v in sensitivities], exchange_rate=float(exchange_rate))
        info.update(boundaries=None, num_stages=len(stages))
    else:
        stages = [(SINGLE_STAGE_NAME, 0, T)]
        steps = schedule.steps_per_stage(timesteps, stages)
        sparsities = [target]
        if stage_sparsities is not None:
            vals = list(stage_sparsities.values()) if isinstance(stage_sparsities, Mapping) else list(stage_sparsities)
            if len(vals) != 1:
                raise ValueError(f"method={method!r} has one stage; got {len(vals)} stage sparsities")
            sparsities = [check_fraction("stage sparsity", vals[0])]
        info.update(boundaries=None)
    n_steps = sum(steps.values())
    mean = sum(steps[name] * s for (name, _, _), s in zip(stages, sparsities)) / n_steps
    info.update(steps_per_stage=dict(steps), stage_sparsities=[float(s) for s in sparsities],
                mean_sparsity=float(mean), num_train_timesteps=T)  # the stage ranges' end (coverage check)
    planned = [(name, int(t0), int(t1), float(s)) for (name, t0, t1), s in zip(stages, sparsities)]
    return planned, info
