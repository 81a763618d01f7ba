r"""MosaicDiff end to end: divide the trajectory, calibrate and prune each stage, build the mosaic.

``prune(model, calibration, target_sparsity)`` returns a `mosaicdiff.mosaic.MosaicDiT`:

1. **Divide** (``method="mosaic"``): stage boundaries from the closed-form learning-speed score
   of the model's noise schedule (or explicit ones); steps per stage counted on the sampler's
   actual timesteps; per-stage sparsities allocated so that their step-weighted mean equals the
   target and the fast-learning middle stage is pruned least (or explicit ones).
2. **Calibrate**: per stage, clean data noised to ``t ~ U[stage)`` (duplicated with the null
   class for CFG); one pass of the dense model collects every block's ``proj``/``fc2`` input
   Hessians.
3. **Prune**: per block, greedy structured OBS removes heads and MLP channels (same ratio in
   every block) and compensates the consumers; widths are aligned.

Baselines share the code path: ``"uniform"`` (one OBS stage for all t at the target sparsity,
calibrated on t uniform over [0, T)), ``"magnitude"`` (one stage, least-norm groups dropped, no
compensation, no calibration needed) and ``"random"``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mosaicdiff import compact, schedule
from mosaicdiff.calibrate import Calibration, collect_hessians, resolve_alphas_cumprod, stage_inputs
from mosaicdiff.integrations import diffusers_dit as dit
from mosaicdiff.types import StageSpec

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "PRUNERS", "plan_stages", "prune", "prune_stages"]

#: Stage layouts of `prune`.
METHODS = ("mosaic", "uniform", "magnitude", "random")
#: Column-removal methods per stage (`mosaicdiff.compact.prune_block`).
PRUNERS = compact.METHODS
_DEFAULT_PRUNER = {"mosaic": "obs", "uniform": "obs", "magnitude": "magnitude", "random": "random"}
#: Name of the single stage of the one-stage methods.
SINGLE_STAGE_NAME = "all"


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


#: How far above the target mean a stage's allocated sparsity may go by default (see `default_s_max`).
DEFAULT_MAX_EXCESS = 0.1


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
                stage_sparsities=None, alphas_cumprod=None, timesteps=None, M: float = 0.55,
                lam: float = 0.0, x0_sq_norm: float = 1.0,
                s_max: float | None = None) -> tuple[list[tuple[str, int, int, float]], dict[str, Any]]:
    """The stages (name, t_start, t_end, sparsity) of a method, without touching a model.

    Args:
        target_sparsity (`float`): mean sparsity over the sampler's steps, in [0, 1).
        method (`str`): one of `METHODS`.
        boundaries (`tuple[int, int]`, *optional*): ``(t_low, t_high)`` of the middle stage;
            default: `schedule.stage_boundaries` (``method="mosaic"`` only).
        stage_sparsities (*optional*): explicit sparsities: three values (early, middle, late)
            or a name -> value mapping for ``"mosaic"``, one value for the others.
        alphas_cumprod (*optional*): training ``abar``; default DiT's linear schedule.
        timesteps (*optional*): the sampler's timesteps (for the step counts); default
            `diffusers_dit.sampler_timesteps(50)`.
        M (`float`), lam (`float`), x0_sq_norm (`float`): see `schedule.stage_boundaries`.
        s_max (`float`, *optional*): upper clip of the allocation; default
            `default_s_max(target_sparsity)`.

    Returns:
        `(stages, info)`: stages in sampling order and a JSON-ready dict (boundaries, steps per
        stage, stage scores, step-weighted mean sparsity).

    Raises:
        ValueError: on an unknown method or invalid sparsities / boundaries.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    target = _check_fraction("target_sparsity", target_sparsity)
    if s_max is not None and (isinstance(s_max, bool) or not isinstance(s_max, (int, float))
                              or not 0 < s_max < 1):
        raise ValueError(f"s_max must be a number in (0, 1), got {s_max!r}")
    capped = s_max is None
    s_max = default_s_max(target) if s_max is None else float(s_max)
    abar = resolve_alphas_cumprod(alphas_cumprod).numpy()
    T = int(abar.size)
    if timesteps is None:
        timesteps = dit.sampler_timesteps(50)
    info: dict[str, Any] = {}
    if method == "mosaic":
        if boundaries is None:
            bounds = schedule.stage_boundaries(abar, M=M, lam=lam, x0_sq_norm=x0_sq_norm)
        else:
            if isinstance(boundaries, (str, bytes)) or not hasattr(boundaries, "__len__") or len(boundaries) != 2:
                raise ValueError(f"boundaries must be a pair of integer timesteps (t_low, t_high), "
                                 f"got {boundaries!r}")
            bounds = (boundaries[0], boundaries[1])
        stages = schedule.stages_from_boundaries(*bounds, T=T)
        bounds = (int(bounds[0]), int(bounds[1]))
        steps = schedule.steps_per_stage(timesteps, stages)
        scores = schedule.stage_mean_scores(stages, schedule.normalized_score(abar, lam, x0_sq_norm))
        explicit = None
        if stage_sparsities is not None:
            if isinstance(stage_sparsities, Mapping):
                names = [s[0] for s in stages]
                if set(stage_sparsities) != set(names):
                    raise ValueError(f"stage_sparsities must name the stages {names}, got {sorted(stage_sparsities)}")
                explicit = [stage_sparsities[n] for n in names]
            else:
                explicit = list(stage_sparsities)
            explicit = [_check_fraction("stage sparsity", v) for v in explicit]
        elif target > s_max:  # said here in the public names (allocate_sparsity says target_mean)
            how = "the default cap min(0.9, target_sparsity + 0.1)" if capped else "passed"
            raise ValueError(
                f"target_sparsity={target:g} is above s_max={s_max:g} ({how}), the largest sparsity "
                f"the allocation may give a stage; use target_sparsity <= {s_max:g}, pass s_max with "
                f"target_sparsity <= s_max < 1, or pass stage_sparsities")
        sparsities = schedule.allocate_sparsity(target, scores, steps, s_max=s_max, explicit=explicit)
        info.update(boundaries=list(bounds), stage_scores=[float(s) for s in scores])
    else:
        stages = [(SINGLE_STAGE_NAME, 0, T)]
        steps = schedule.steps_per_stage(timesteps, stages)
        sparsities = [target]
        if stage_sparsities is not None:
            vals = list(stage_sparsities.values()) if isinstance(stage_sparsities, Mapping) else list(stage_sparsities)
            if len(vals) != 1:
                raise ValueError(f"method={method!r} has one stage; got {len(vals)} stage sparsities")
            sparsities = [_check_fraction("stage sparsity", vals[0])]
        info.update(boundaries=None)
    n_steps = sum(steps.values())
    mean = sum(steps[name] * s for (name, _, _), s in zip(stages, sparsities)) / n_steps
    info.update(steps_per_stage=dict(steps), stage_sparsities=[float(s) for s in sparsities],
                mean_sparsity=float(mean), num_train_timesteps=T)
    planned = [(name, int(t0), int(t1), float(s)) for (name, t0, t1), s in zip(stages, sparsities)]
    return planned, info


def _check_align(align) -> int | None:
    if align is None:
        return None
    try:
        value = None if isinstance(align, bool) else operator.index(align)  # ints, numpy ints
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"align must be a positive integer or None, got {align!r}")
    return value


def _check_widths(planned, num_heads: int, mlp_dense: int, align, stage_sparsities) -> None:
    """Every planned stage keeps a head and can prune its MLP; messages in the public names."""
    limit = (num_heads - 0.5) / num_heads  # heads_to_remove rounds half up
    single = len(planned) == 1 and stage_sparsities is None
    for name, _, _, sp in planned:
        try:
            compact.heads_to_remove(num_heads, sp)
            continue
        except ValueError:  # said below in the public names (it speaks of head_sparsity)
            pass
        if single:
            label, fix = f"target_sparsity={sp:g}", f"use target_sparsity < {limit:.4f}"
        elif stage_sparsities is not None:
            label, fix = f"stage {name!r} with sparsity {sp:.3f}", f"use stage sparsities < {limit:.4f}"
        else:
            label = f"stage {name!r} with sparsity {sp:.3f}"
            fix = f"pass s_max < {limit:.4f} (or a lower target_sparsity) or explicit stage_sparsities"
        raise ValueError(f"{label} removes {num_heads} of {num_heads} attention heads per block; "
                         f"at least one head must be kept: {fix}")
    # an alignment of the MLP width or more rounds every kept width back up to the dense width
    if align is not None and align > 1 and align >= mlp_dense and any(sp > 0 for *_, sp in planned):
        raise ValueError(
            f"align={align} is not smaller than the MLP width {mlp_dense}: every kept MLP width would "
            f"round up to all {mlp_dense} channels and the MLP would not be pruned; use an align "
            f"below {mlp_dense} (a small divisor of it, e.g. 8 or 16) or align=None")


def _prune(model: nn.Module, calibration: Calibration | None, target_sparsity: float, *, method: str,
           pruner: str | None, boundaries, stage_sparsities, num_inference_steps: int, scheduler,
           samples_per_stage: int, M: float, lam: float, align: int | None, cfg: bool,
           batch_size: int, seed: int, progress: bool, s_max: float | None,
           groups_per_step: int) -> tuple[list[StageSpec], dict[str, Any]]:
    # 1. Validate.
    dit.validate_dit(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pruner = _DEFAULT_PRUNER[method] if pruner is None else pruner
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    target = _check_fraction("target_sparsity", target_sparsity)
    if int(samples_per_stage) != samples_per_stage or samples_per_stage < 1:
        raise ValueError(f"samples_per_stage must be a positive integer, got {samples_per_stage!r}")
    param = next(model.parameters())
    if calibration is not None:
        if not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be a mosaicdiff.calibrate.Calibration, got {type(calibration).__name__}")
        if len(calibration) == 0:
            raise ValueError("calibration is empty")
        if calibration.device != param.device:
            raise ValueError(f"calibration data is on {calibration.device} but the model is on {param.device}; "
                             f"move one of them (Calibration(x0.to(device), labels.to(device), ...))")
        calibration.check_model(model)  # shape, null class, labels, NaN: before any long work
    align = _check_align(align)

    # 2. Divide: stages, step counts, sparsities.
    abar = resolve_alphas_cumprod(scheduler)
    timesteps = dit.sampler_timesteps(num_inference_steps, scheduler)
    r = calibration.x0_sq_norm if calibration is not None else 1.0
    planned, info = plan_stages(target, method=method, boundaries=boundaries,
                                stage_sparsities=stage_sparsities, alphas_cumprod=abar,
                                timesteps=timesteps, M=M, lam=lam, x0_sq_norm=r, s_max=s_max)
    num_heads = dit.model_num_heads(model)
    mlp_dense = dit.block_linears(dit.transformer_blocks(model)[0])["fc2"].in_features
    _check_widths(planned, num_heads, mlp_dense, align, stage_sparsities)
    needs_data = pruner == "obs" and any(sp > 0 for *_, sp in planned)
    if needs_data and calibration is None:
        raise ValueError(f"method={method!r} with pruner='obs' needs calibration data, got None")

    # 3. Calibrate and prune each stage.
    blocks = dit.transformer_blocks(model)
    obs_kwargs = {"groups_per_step": int(groups_per_step)} if pruner == "obs" else {}
    generator = torch.Generator().manual_seed(int(seed))
    stages: list[StageSpec] = []
    widths = {}
    for name, t0, t1, sp in planned:
        hessians = None
        if sp > 0 and pruner == "obs":
            x_t, t, labels = stage_inputs(calibration, t0, t1, int(samples_per_stage), cfg=cfg,
                                          generator=generator, alphas_cumprod=abar)
            logger.info("stage %s [%d, %d): calibrating on %d inputs", name, t0, t1, x_t.shape[0])
            hessians = collect_hessians(model, x_t, t, labels, batch_size=batch_size, progress=progress)
            del x_t, t, labels
        compact_blocks = []
        for i, block in enumerate(tqdm(blocks, desc=f"pruning {name} (s={sp:.2f})", disable=not progress,
                                       leave=False)):
            if sp == 0:
                compact_blocks.append(dit.dense_block_weights(block, num_heads))
                continue
            h = hessians[i] if hessians is not None else None
            compact_blocks.append(compact.prune_block(
                dit.block_linears(block), h, num_heads, sp, sp, method=pruner, align=align,
                generator=generator, **obs_kwargs))
            if hessians is not None:
                hessians[i] = None  # free the float64 matrices as we go
        del hessians
        stages.append(StageSpec(name, t0, t1, sp, compact_blocks))
        b0 = compact_blocks[0]
        widths[name] = {"heads": b0.num_heads, "mlp": b0.mlp_width,
                        "head_sparsity": 1.0 - b0.num_heads / num_heads,
                        "mlp_sparsity": 1.0 - b0.mlp_width / mlp_dense}
        logger.info("stage %s [%d, %d): sparsity %.3f -> %d heads, MLP width %d", name, t0, t1, sp,
                    widths[name]["heads"], widths[name]["mlp"])

    from mosaicdiff._version import __version__

    steps = info["steps_per_stage"]
    n_steps = sum(steps.values())
    realized = {key: sum(steps[n] * widths[n][key] for n in widths) / n_steps
                for key in ("head_sparsity", "mlp_sparsity")}

    meta = {
        "method": method,
        "pruner": pruner,
        "target_sparsity": target,
        **info,
        "stage_widths": widths,
        "realized_mean_sparsity": realized,
        "num_inference_steps": int(num_inference_steps),
        "scheduler": type(scheduler).__name__ if scheduler is not None else "DDIMScheduler",
        "samples_per_stage": int(samples_per_stage) if needs_data else 0,
        "M": float(M),
        "lam": float(lam),
        "x0_sq_norm": float(r),
        "s_max": float(default_s_max(target) if s_max is None else s_max),
        "align": None if align is None else int(align),
        "cfg": bool(cfg),
        "seed": int(seed),
        "groups_per_step": int(groups_per_step),
        "mosaicdiff_version": __version__,
    }
    return stages, meta


def prune_stages(model: nn.Module, calibration: Calibration | None, target_sparsity: float = 0.5, *,
                 method: str = "mosaic", pruner: str | None = None, boundaries=None, stage_sparsities=None,
                 num_inference_steps: int = 50, scheduler=None, samples_per_stage: int = 128,
                 M: float = 0.55, lam: float = 0.0, align: int | None = 64, cfg: bool = True,
                 batch_size: int = 64, seed: int = 0, progress: bool = True, s_max: float | None = None,
                 groups_per_step: int = 1) -> list[StageSpec]:
    """The pruned stages of `prune` (without building the `MosaicDiT`); same arguments, plus:

    Args:
        pruner (`str`, *optional*): the per-stage column-removal method (``"obs"``,
            ``"magnitude"``, ``"random"``), overriding the method's own (e.g. a three-stage
            layout with magnitude selection, for timing runs without calibration data).

    Returns:
        `list[StageSpec]` in sampling order.
    """
    stages, _ = _prune(model, calibration, target_sparsity, method=method, pruner=pruner,
                       boundaries=boundaries, stage_sparsities=stage_sparsities,
                       num_inference_steps=num_inference_steps, scheduler=scheduler,
                       samples_per_stage=samples_per_stage, M=M, lam=lam, align=align, cfg=cfg,
                       batch_size=batch_size, seed=seed, progress=progress, s_max=s_max,
                       groups_per_step=groups_per_step)
    return stages


def prune(model: nn.Module, calibration: Calibration | None, target_sparsity: float = 0.5, *,
          method: str = "mosaic", boundaries: Sequence[int] | None = None, stage_sparsities=None,
          num_inference_steps: int = 50, scheduler=None, samples_per_stage: int = 128, M: float = 0.55,
          lam: float = 0.0, align: int | None = 64, cfg: bool = True, batch_size: int = 64, seed: int = 0,
          progress: bool = True, s_max: float | None = None, groups_per_step: int = 1):
    r"""Prunes a DiT into a stage-switching `MosaicDiT`, without training.

    Sparsity is the fraction of attention heads and of MLP channels removed (the same ratio in
    every block); the kept MLP width is rounded to a multiple of `align`.

    Args:
        model (`DiTTransformer2DModel`): the dense model (left unchanged).
        calibration (`Calibration`): clean data on the model's device, shaped like the model's
            input (``(N, in_channels, sample_size, sample_size)``) with the model's null class
            (``num_embeds_ada_norm``); may be None for ``"magnitude"`` and ``"random"``.
        target_sparsity (`float`, *optional*, defaults to 0.5): mean sparsity over the sampler's
            steps, in [0, 1).
        method (`str`, *optional*, defaults to ``"mosaic"``): ``"mosaic"`` (three stages,
            per-stage calibration and allocation), ``"uniform"`` (one OBS stage for all t),
            ``"magnitude"`` or ``"random"`` (one stage, no compensation).
        boundaries (`tuple[int, int]`, *optional*): integer timesteps ``(t_low, t_high)`` (floats,
            even ``200.0``, and bools are refused rather than rounded): early is
            ``t >= t_high``, middle ``t_low <= t < t_high``, late ``t < t_low``. Default: from
            the closed-form score of the scheduler's ``alphas_cumprod`` (see
            `mosaicdiff.schedule.stage_boundaries`), with ``r`` estimated from the calibration.
        stage_sparsities (*optional*): explicit per-stage sparsities (early, middle, late),
            replacing the allocation.
        num_inference_steps (`int`, *optional*, defaults to 50): sampler steps used to count
            the steps per stage.
        scheduler (*optional*): the diffusers scheduler you will sample with (its
            ``alphas_cumprod`` and timesteps); default ``DDIMScheduler(num_train_timesteps=1000,
            beta_schedule="linear")``.
        samples_per_stage (`int`, *optional*, defaults to 128): calibration samples per stage
            (each duplicated with the null class when `cfg`).
        M (`float`, *optional*, defaults to 0.55): middle-stage threshold relative to the peak score.
        lam (`float`, *optional*, defaults to 0.0): log-SNR weight of the score.
        align (`int`, *optional*, defaults to 64): MLP width alignment (None: off). Must be
            smaller than the MLP width: a larger one would round every kept width back up to the
            dense width (an unpruned MLP), so it is refused rather than silently ignored.
        cfg (`bool`, *optional*, defaults to True): calibrate both CFG branches.
        batch_size (`int`, *optional*, defaults to 64): calibration batch size.
        seed (`int`, *optional*, defaults to 0): seeds calibration draws (and random pruning).
        progress (`bool`, *optional*, defaults to True): tqdm progress bars.
        s_max (`float`, *optional*): largest sparsity the allocation may assign, in (0, 1) and
            at least `target_sparsity`; default ``min(0.9, target_sparsity + 0.1)``
            (`default_s_max`: the uncapped allocation over-prunes the early stage). A target
            above 0.9 needs an explicit `s_max` (or `stage_sparsities`).
        groups_per_step (`int`, *optional*, defaults to 1): MLP channels removed per OBS
            iteration (1 = exact greedy; see `mosaicdiff.obs.prune_columns`).

    Returns:
        `MosaicDiT` with the stages and ``meta`` (method, boundaries, target and per-stage
        sparsities, steps per stage, kept widths, settings).

    Raises:
        ValueError: sparsity outside [0, 1), a target above `s_max`, a stage sparsity that
            removes every head, a model that is not a DiT, empty or missing calibration,
            calibration on another device than the model or not fitting it (sample shape, null
            class, labels, NaN/inf), bad boundaries, or an `align` not below the MLP width. All
            are raised before any calibration pass.
        TypeError: calibration of the wrong type.

    Examples:
        >>> import torch
        >>> from diffusers import DiTTransformer2DModel
        >>> from mosaicdiff.calibrate import Calibration
        >>> from mosaicdiff.pruning import prune
        >>> dense = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        >>> calib = Calibration(torch.randn(8, 4, 8, 8), torch.arange(8) % 10, null_class=10)
        >>> mosaic = prune(dense, calib, 0.3, boundaries=(200, 600), samples_per_stage=4,
        ...                align=None, progress=False)
        >>> [(s.name, s.t_start, s.t_end) for s in mosaic.stages]
        [('early', 600, 1000), ('middle', 200, 600), ('late', 0, 200)]
    """
    from mosaicdiff.mosaic import MosaicDiT

    stages, meta = _prune(model, calibration, target_sparsity, method=method, pruner=None,
                          boundaries=boundaries, stage_sparsities=stage_sparsities,
                          num_inference_steps=num_inference_steps, scheduler=scheduler,
                          samples_per_stage=samples_per_stage, M=M, lam=lam, align=align, cfg=cfg,
                          batch_size=batch_size, seed=seed, progress=progress, s_max=s_max,
                          groups_per_step=groups_per_step)
    config = getattr(dit.unwrap_model(model), "config", None)
    source = getattr(config, "_name_or_path", None) if config is not None else None
    return MosaicDiT(model, stages, source=source or type(dit.unwrap_model(model)).__name__, meta=meta)
