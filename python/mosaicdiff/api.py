r"""The public entry point: ``mosaicdiff.prune(model, calibration, target_sparsity)``.

Finds the model's family in the registry (`mosaicdiff.families.family_for`), runs the method on
it through the family's adapter (`mosaicdiff.method.pruning.prune_with_adapter`) and builds the
family's mosaic from the pruned stages (``mosaic_class.from_dense``). The method never names a
family; the families never run the method: this module is where the two meet.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from mosaicdiff.core.stages import StageSpec
from mosaicdiff.families import Family, family_for
from mosaicdiff.method import schedule, step_allocation
from mosaicdiff.method.conditioned_calibration import ConditionedCalibration
from mosaicdiff.method.pruning import prune_with_adapter

__all__ = ["prune", "prune_stages"]


def _share_default(family: Family, share_producers: bool | None) -> bool:
    """None: share producers where the family's mosaic class supports it."""
    if share_producers is None:
        return bool(getattr(family.mosaic_class, "shares_producers", False))
    return bool(share_producers)


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`prune`'s keyword options (its signature is their one definition), filled with its defaults."""
    defaults = {name: p.default for name, p in inspect.signature(prune).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"prune_stages: unexpected keyword argument(s) {unknown}; the options are {sorted(defaults)}")
    return {**defaults, **kwargs}


def prune_stages(model: nn.Module, calibration: ConditionedCalibration | None, target_sparsity: float = 0.5, *,
                 pruner: str | None = None, **options: Any) -> list[StageSpec]:
    """The pruned stages of `prune` (without building the mosaic); same arguments, plus:

    Args:
        pruner (`str`, *optional*): the per-stage column-removal method (``"obs"``,
            ``"magnitude"``, ``"random"``), overriding the method's own (e.g. a three-stage
            layout with magnitude selection, for timing runs without calibration data).

    Returns:
        `list[StageSpec]` in sampling order.
    """
    family = family_for(model)
    options = _options(options)
    options["share_producers"] = _share_default(family, options["share_producers"])
    stages, _ = prune_with_adapter(model, family.adapter, calibration, target_sparsity, pruner=pruner, **options)
    return stages


def prune(model: nn.Module, calibration: ConditionedCalibration | None, target_sparsity: float = 0.5, *,
          method: str = "mosaic", boundaries: Sequence[int] | None = None, stage_sparsities=None,
          num_inference_steps: int = 50, scheduler=None, samples_per_stage: int = 128,
          speed_threshold: float = schedule.DEFAULT_SPEED_THRESHOLD,
          log_snr_weight: float = schedule.DEFAULT_LOG_SNR_WEIGHT, align: int | None = 64, cfg: bool = True,
          batch_size: int = 64, seed: int = 0, progress: bool = True, s_max: float | None = None,
          groups_per_step: int = 1, share_producers: bool | None = None,
          num_stages: int = step_allocation.DEFAULT_NUM_STAGES,
          exchange_rate: float = step_allocation.DEFAULT_EXCHANGE_RATE):
    r"""Prunes a dense model into its family's stage-switching mosaic (`MosaicDiT` for a DiT,
    `MosaicUNet` for a U-Net; `mosaicdiff.families`), without training.

    Sparsity is the fraction of attention heads and of MLP channels removed (the same ratio in
    every block); the kept MLP width is rounded to a multiple of `align`.

    Args:
        model (`nn.Module`): the dense model (left unchanged), of a registered family
            (``DiTTransformer2DModel``, ``UNet2DConditionModel``).
        calibration (`ConditionedCalibration`): clean latents on the model's device with their
            conditions (`Calibration` for a DiT: class labels and the null class;
            `TextCalibration` for a U-Net: text states); may be None for ``"magnitude"`` and
            ``"random"``.
        target_sparsity (`float`, *optional*, defaults to 0.5): mean sparsity over the sampler's
            steps, in [0, 1).
        method (`str`, *optional*, defaults to ``"mosaic"``): ``"mosaic"`` (three stages,
            per-stage calibration and allocation), ``"stepwise"`` (`num_stages` stages of equal
            step counts, sparsities allocated from each stage's probed error, kept sets nested:
            `mosaicdiff.method.step_allocation`), ``"uniform"`` (one OBS stage for all t),
            ``"magnitude"`` or ``"random"`` (one stage, no compensation).
        boundaries (`tuple[int, int]`, *optional*): integer timesteps ``(t_low, t_high)`` (floats,
            even ``200.0``, and bools are refused rather than rounded): early is
            ``t >= t_high``, middle ``t_low <= t < t_high``, late ``t < t_low``. Default: from
            the closed-form score of the scheduler's ``alphas_cumprod`` (see
            `mosaicdiff.method.schedule.stage_boundaries`), with ``r`` estimated from the calibration.
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
        cfg (`bool`, *optional*, defaults to True): calibrate both CFG branches (ignored for a
            calibration made with ``cfg=False``, e.g. a guidance-distilled model).
        batch_size (`int`, *optional*, defaults to 64): calibration batch size.
        seed (`int`, *optional*, defaults to 0): seeds calibration draws (and random pruning).
        progress (`bool`, *optional*, defaults to True): tqdm progress bars (on rank 0 only under a
            torch.distributed process group, where calibration is data parallel: see
            `mosaicdiff.method.calibrate`).
        s_max (`float`, *optional*): largest sparsity the allocation may assign, in (0, 1) and
            at least `target_sparsity`; default ``min(0.9, target_sparsity + 0.1)``
            (`default_s_max`: the uncapped allocation over-prunes the early stage). A target
            above 0.9 needs an explicit `s_max` (or `stage_sparsities`).
        groups_per_step (`int`, *optional*, defaults to 1): MLP channels removed per OBS
            iteration (1 = exact greedy; see `mosaicdiff.method.obs.prune_columns`).
        share_producers (`bool`, *optional*): True: the least pruned stage is pruned first and
            every other stage keeps a subset of its heads and channels, so that each block
            position stores its q/k/v and fc1 rows once for all stages (views, no copies:
            `mosaicdiff.families.dit.producers`); only the compensated consumers are per stage. False:
            every stage selects freely and stores its own producers (more memory; quality of both
            in ``docs/results.md``). None (default): True where the family's mosaic class
            supports it (``shares_producers``: DiT and U-Net).
        num_stages (`int`, *optional*, defaults to 10): ``"stepwise"`` only: the stages.
        exchange_rate (`float`, *optional*, defaults to 7.0): ``"stepwise"`` only: how fast a
            stage's error is taken to grow with its sparsity (``c exp(a s)``); larger is closer to
            uniform (`mosaicdiff.method.step_allocation.allocate_exponential`).

    Returns:
        The family's mosaic (`MosaicDiT` for a DiT) with the stages and ``meta`` (method,
        boundaries, target and per-stage sparsities, steps per stage, kept widths, settings).

    Raises:
        ValueError: sparsity outside [0, 1), a target above `s_max`, a stage sparsity that
            removes every head, a model no adapter handles (`mosaicdiff.families.family_for`) or
            that its adapter refuses, empty or missing calibration,
            calibration on another device than the model or not fitting it (sample shape, null
            class, labels, NaN/inf), bad boundaries, or an `align` not below the MLP width. All
            are raised before any calibration pass.
        TypeError: calibration of the wrong type, or with another family's condition keys.

    Examples:
        >>> import torch
        >>> from diffusers import DiTTransformer2DModel
        >>> from mosaicdiff.calibrate import Calibration
        >>> from mosaicdiff import prune
        >>> dense = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        >>> calib = Calibration(torch.randn(8, 4, 8, 8), torch.arange(8) % 10, null_class=10)
        >>> mosaic = prune(dense, calib, 0.3, boundaries=(200, 600), samples_per_stage=4,
        ...                align=None, progress=False)
        >>> [(s.name, s.t_start, s.t_end) for s in mosaic.stages]
        [('early', 600, 1000), ('middle', 200, 600), ('late', 0, 200)]
    """
    family = family_for(model)
    stages, meta = prune_with_adapter(
        model, family.adapter, calibration, target_sparsity, pruner=None, method=method, boundaries=boundaries,
        stage_sparsities=stage_sparsities, num_inference_steps=num_inference_steps, scheduler=scheduler,
        samples_per_stage=samples_per_stage, speed_threshold=speed_threshold, log_snr_weight=log_snr_weight,
        align=align, cfg=cfg, batch_size=batch_size, seed=seed, progress=progress, s_max=s_max,
        groups_per_step=groups_per_step, share_producers=_share_default(family, share_producers),
        num_stages=num_stages, exchange_rate=exchange_rate)
    return family.mosaic_class.from_dense(model, stages, source=family.adapter.source_name(model), meta=meta,
                                   share_producers=meta["share_producers"])
