r"""MosaicDiff end to end: divide the trajectory, calibrate and prune each stage, build the mosaic.

``prune(model, calibration, target_sparsity)`` returns the model family's mosaic (`MosaicDiT` for
a DiT); the model is seen only through its adapter (`mosaicdiff.models.family_for`):

1. **Divide** (``method="mosaic"``): stage boundaries from the closed-form learning-speed score
   of the model's noise schedule (or explicit ones); steps per stage counted on the sampler's
   actual timesteps; per-stage sparsities allocated so that their step-weighted mean equals the
   target and the fast-learning middle stage is pruned least (or explicit ones).
2. **Calibrate**: per stage, clean data noised to ``t ~ U[stage)`` (duplicated with the null
   condition for CFG); one pass of the dense model collects the input Hessians of every prunable
   group's consumer (a DiT block's ``proj`` and ``fc2``).
3. **Prune**: per block, greedy structured OBS removes heads and MLP channels (same ratio in
   every block) and compensates the consumers; widths are aligned.

Baselines share the code path: ``"uniform"`` (one OBS stage for all t at the target sparsity,
calibrated on t uniform over [0, T)), ``"magnitude"`` (one stage, least-norm groups dropped, no
compensation, no calibration needed) and ``"random"``.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mosaicdiff import compact, distributed, schedule
from mosaicdiff._version import __version__
from mosaicdiff.calibrate import Calibration, TextCalibration, collect_hessians, resolve_alphas_cumprod, stage_inputs
from mosaicdiff.integrations.schedulers import sampler_timesteps
from mosaicdiff.models import family_for
from mosaicdiff.stage_plan import METHODS, check_fraction, default_s_max, plan_stages
from mosaicdiff.types import StageSpec

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "PRUNERS", "default_s_max", "plan_stages", "prune", "prune_stages"]

#: Column-removal methods per stage (`mosaicdiff.compact.prune_group`).
PRUNERS = compact.METHODS
_DEFAULT_PRUNER = {"mosaic": "obs", "uniform": "obs", "magnitude": "magnitude", "random": "random"}
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


def _check_widths(planned, groups, align, stage_sparsities) -> None:
    """Every planned stage keeps a head and can prune its MLP; messages in the public names."""
    single = len(planned) == 1 and stage_sparsities is None
    for group in groups.values():
        n = group.num_units
        if group.kind == "heads":
            limit = (n - 0.5) / n  # heads_to_remove rounds half up
            for name, _, _, sp in planned:
                try:
                    compact.heads_to_remove(n, sp)
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
                raise ValueError(f"{label} removes {n} of {n} attention heads per block; "
                                 f"at least one head must be kept: {fix}")
        # an alignment of the MLP width or more rounds every kept width back up to the dense width
        elif align is not None and align > 1 and align >= n and any(sp > 0 for *_, sp in planned):
            raise ValueError(
                f"align={align} is not smaller than the MLP width {n}: every kept MLP width would "
                f"round up to all {n} channels and the MLP would not be pruned; use an align "
                f"below {n} (a small divisor of it, e.g. 8 or 16) or align=None")


def stage_generator(seed: int, stage_index: int) -> torch.Generator:
    """The generator of stage `stage_index`'s calibration draws (and random pruning): one per stage,
    so a stage's draws do not depend on which stages were pruned before it."""
    return torch.Generator().manual_seed(int(seed) * 1009 + int(stage_index))


def _prune(model: nn.Module, calibration: Calibration | None, target_sparsity: float, *, pruner: str | None,
           method: str, boundaries, stage_sparsities, num_inference_steps: int, scheduler,
           samples_per_stage: int, speed_threshold: float, log_snr_weight: float, align: int | None, cfg: bool,
           batch_size: int, seed: int, progress: bool, s_max: float | None,
           groups_per_step: int, share_producers: bool | None) -> tuple[type, list[StageSpec], dict[str, Any]]:
    # 1. Validate.
    family = family_for(model)
    adapter = family.adapter
    adapter.validate(model)
    if share_producers is None:
        share_producers = bool(getattr(family.mosaic_class, "shares_producers", False))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pruner = _DEFAULT_PRUNER[method] if pruner is None else pruner
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    target = check_fraction("target_sparsity", target_sparsity)
    if int(samples_per_stage) != samples_per_stage or samples_per_stage < 1:
        raise ValueError(f"samples_per_stage must be a positive integer, got {samples_per_stage!r}")
    param = next(model.parameters())
    if calibration is not None:
        if not isinstance(calibration, (Calibration, TextCalibration)):
            raise TypeError(f"calibration must be a mosaicdiff.calibrate.Calibration (class-conditional DiT) or "
                            f"TextCalibration (text-conditioned U-Net), got {type(calibration).__name__}")
        if len(calibration) == 0:
            raise ValueError("calibration is empty")
        if calibration.device != param.device:
            raise ValueError(f"calibration data is on {calibration.device} but the model is on {param.device}; "
                             f"move one of them (Calibration(x0.to(device), labels.to(device), ...))")
        adapter.check_calibration(model, calibration)  # shape, null class, labels, NaN: before long work
    align = _check_align(align)

    # 2. Divide: stages, step counts, sparsities (on the family's own schedule unless one is given).
    scheduler = adapter.default_scheduler() if scheduler is None else scheduler
    abar = resolve_alphas_cumprod(scheduler)
    timesteps = sampler_timesteps(num_inference_steps, scheduler)
    r = calibration.x0_sq_norm if calibration is not None else 1.0
    planned, info = plan_stages(target, method=method, boundaries=boundaries, stage_sparsities=stage_sparsities,
                                alphas_cumprod=abar, timesteps=timesteps, speed_threshold=speed_threshold,
                                log_snr_weight=log_snr_weight, x0_sq_norm=r, s_max=s_max)
    blocks = adapter.blocks(model)
    _check_widths(planned, adapter.groups(blocks[0]), align, stage_sparsities)
    needs_data = pruner == "obs" and any(sp > 0 for *_, sp in planned)
    if needs_data and calibration is None:
        raise ValueError(f"method={method!r} with pruner='obs' needs calibration data, got None")

    # 3. Calibrate and prune each stage; with shared producers the least pruned stage first, the
    # others keeping subsets of its units (so that one storage serves all: producer_layout).
    obs_kwargs = {"groups_per_step": int(groups_per_step)} if pruner == "obs" else {}
    by_sparsity = sorted(range(len(planned)), key=lambda i: planned[i][3])
    order = by_sparsity if share_producers else list(range(len(planned)))
    kept_sets: dict[int, list[dict[str, torch.Tensor]]] = {}
    stages: list[StageSpec | None] = [None] * len(planned)
    widths = {}
    for rank, k in enumerate(order):
        name, t0, t1, sp = planned[k]
        generator = stage_generator(seed, k)
        parent = None
        if share_producers and rank > 0:
            parent = kept_sets[by_sparsity[0] if len(planned) <= 3 else order[rank - 1]]
        hessians = None
        if sp > 0 and pruner == "obs":
            x_t, t, condition = stage_inputs(calibration, t0, t1, int(samples_per_stage), cfg=cfg,
                                             generator=generator, alphas_cumprod=abar)
            logger.info("stage %s [%d, %d): calibrating on %d inputs", name, t0, t1, x_t.shape[0])
            hessians = collect_hessians(model, x_t, t, condition, batch_size=batch_size, progress=progress,
                                        adapter=adapter)
            del x_t, t, condition
        compact_blocks, kept = [], []
        show = progress and distributed.is_main_process()
        for i, block in enumerate(tqdm(blocks, desc=f"pruning {name} (s={sp:.2f})", disable=not show, leave=False)):
            if sp == 0:
                compact_blocks.append(adapter.dense_block(block))
                kept.append(None)
                continue
            h = hessians[i] if hessians is not None else None
            within = parent[i] if parent is not None else None
            pruned = compact.prune_groups(adapter.groups(block), h, sp, method=pruner, align=align,
                                          generator=generator, keep_within=within, **obs_kwargs)
            compact_blocks.append(adapter.compact_block(block, pruned))
            kept.append({g: p.kept for g, p in pruned.items()})
            if hessians is not None:
                hessians[i] = None  # free the float64 matrices as we go
        del hessians
        kept_sets[k] = kept if sp > 0 else [None] * len(blocks)
        stages[k] = StageSpec(name, t0, t1, sp, compact_blocks)
        widths[name] = adapter.block_widths(blocks[0], compact_blocks[0])
        logger.info("stage %s [%d, %d): sparsity %.3f -> widths %s", name, t0, t1, sp, widths[name])
    widths = {planned[k][0]: widths[planned[k][0]] for k in range(len(planned))}  # sampling order

    steps = info["steps_per_stage"]
    n_steps = sum(steps.values())
    keys = [k for k in widths[planned[0][0]] if k.endswith("_sparsity")]
    realized = {key: sum(steps[n] * widths[n][key] for n in widths) / n_steps for key in keys}
    meta = {
        "method": method, "pruner": pruner, "target_sparsity": target, **info,
        "stage_widths": widths, "realized_mean_sparsity": realized,
        "num_inference_steps": int(num_inference_steps),
        "scheduler": type(scheduler).__name__,
        "samples_per_stage": int(samples_per_stage) if needs_data else 0,
        "speed_threshold": float(speed_threshold), "log_snr_weight": float(log_snr_weight),
        "x0_sq_norm": float(r), "s_max": float(default_s_max(target) if s_max is None else s_max),
        "align": None if align is None else int(align), "cfg": bool(cfg), "seed": int(seed),
        "groups_per_step": int(groups_per_step), "share_producers": bool(share_producers),
        "mosaicdiff_version": __version__,
    }
    return family.mosaic_class, stages, meta


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`prune`'s keyword options (its signature is their one definition), filled with its defaults."""
    defaults = {name: p.default for name, p in inspect.signature(prune).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"prune_stages: unexpected keyword argument(s) {unknown}; the options are {sorted(defaults)}")
    return {**defaults, **kwargs}


def prune_stages(model: nn.Module, calibration: Calibration | None, target_sparsity: float = 0.5, *,
                 pruner: str | None = None, **options: Any) -> list[StageSpec]:
    """The pruned stages of `prune` (without building the mosaic); same arguments, plus:

    Args:
        pruner (`str`, *optional*): the per-stage column-removal method (``"obs"``,
            ``"magnitude"``, ``"random"``), overriding the method's own (e.g. a three-stage
            layout with magnitude selection, for timing runs without calibration data).

    Returns:
        `list[StageSpec]` in sampling order.
    """
    _, stages, _ = _prune(model, calibration, target_sparsity, pruner=pruner, **_options(options))
    return stages


def prune(model: nn.Module, calibration: Calibration | None, target_sparsity: float = 0.5, *,
          method: str = "mosaic", boundaries: Sequence[int] | None = None, stage_sparsities=None,
          num_inference_steps: int = 50, scheduler=None, samples_per_stage: int = 128,
          speed_threshold: float = schedule.DEFAULT_SPEED_THRESHOLD,
          log_snr_weight: float = schedule.DEFAULT_LOG_SNR_WEIGHT, align: int | None = 64, cfg: bool = True,
          batch_size: int = 64, seed: int = 0, progress: bool = True, s_max: float | None = None,
          groups_per_step: int = 1, share_producers: bool | None = None):
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
        speed_threshold (`float`, *optional*, defaults to `schedule.DEFAULT_SPEED_THRESHOLD` = 0.55):
            the paper's ``M``: the middle stage is where the learning-speed score is at least this
            fraction of its peak.
        log_snr_weight (`float`, *optional*, defaults to `schedule.DEFAULT_LOG_SNR_WEIGHT` = 0.0):
            the paper's ``lambda``: weight of the normalised log-SNR added to the score.
        align (`int`, *optional*, defaults to 64): MLP width alignment (None: off). Must be
            smaller than the MLP width: a larger one would round every kept width back up to the
            dense width (an unpruned MLP), so it is refused rather than silently ignored.
        cfg (`bool`, *optional*, defaults to True): calibrate both CFG branches.
        batch_size (`int`, *optional*, defaults to 64): calibration batch size.
        seed (`int`, *optional*, defaults to 0): seeds calibration draws (and random pruning).
        progress (`bool`, *optional*, defaults to True): tqdm progress bars (on rank 0 only under a
            torch.distributed process group, where calibration is data parallel: see
            `mosaicdiff.calibrate`).
        s_max (`float`, *optional*): largest sparsity the allocation may assign, in (0, 1) and
            at least `target_sparsity`; default ``min(0.9, target_sparsity + 0.1)``
            (`default_s_max`: the uncapped allocation over-prunes the early stage). A target
            above 0.9 needs an explicit `s_max` (or `stage_sparsities`).
        groups_per_step (`int`, *optional*, defaults to 1): MLP channels removed per OBS
            iteration (1 = exact greedy; see `mosaicdiff.obs.prune_columns`).
        share_producers (`bool`, *optional*): True: the least pruned stage is pruned first and
            every other stage keeps a subset of its heads and channels, so that each block
            position stores its q/k/v and fc1 rows once for all stages (views, no copies:
            `mosaicdiff.shared_producers`); only the compensated consumers are per stage. False:
            every stage selects freely and stores its own producers (more memory; quality of both
            in ``docs/results.md``). None (default): True where the family's mosaic class
            supports it (``shares_producers``: DiT and U-Net).

    Returns:
        The family's mosaic (`MosaicDiT` for a DiT) with the stages and ``meta`` (method,
        boundaries, target and per-stage sparsities, steps per stage, kept widths, settings).

    Raises:
        ValueError: sparsity outside [0, 1), a target above `s_max`, a stage sparsity that
            removes every head, a model no adapter handles (`mosaicdiff.models.family_for`) or
            that its adapter refuses, empty or missing calibration,
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
    mosaic_class, stages, meta = _prune(
        model, calibration, target_sparsity, pruner=None, method=method, boundaries=boundaries,
        stage_sparsities=stage_sparsities, num_inference_steps=num_inference_steps, scheduler=scheduler,
        samples_per_stage=samples_per_stage, speed_threshold=speed_threshold, log_snr_weight=log_snr_weight,
        align=align, cfg=cfg, batch_size=batch_size, seed=seed, progress=progress, s_max=s_max,
        groups_per_step=groups_per_step, share_producers=share_producers)
    adapter = family_for(model).adapter
    return mosaic_class.from_dense(model, stages, source=adapter.source_name(model), meta=meta,
                                   share_producers=meta["share_producers"])
