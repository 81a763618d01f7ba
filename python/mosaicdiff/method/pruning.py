r"""The method end to end on one model: divide the trajectory, calibrate and prune each stage.

`prune_with_adapter(model, adapter, calibration, target_sparsity, ...)` returns the pruned stages
and the mosaic's ``meta``; the model is seen only through its `ModelAdapter` (the public
`mosaicdiff.prune` in `mosaicdiff.api` finds the family and builds its mosaic):

1. **Divide** (``method="mosaic"``): stage boundaries from the closed-form learning-speed score
   of the model's noise process (DDPM ``alphas_cumprod``, or rectified flow with the sampler's
   shift: `mosaicdiff.core.schedulers.noise_process`) or explicit ones; steps per stage counted
   on the sampler's actual timesteps; per-stage sparsities allocated so that their step-weighted
   mean equals the target and the fast-learning middle stage is pruned least (or explicit ones).
   ``method="stepwise"``: `num_stages` stages of equal step counts, sparsities allocated from each
   stage's probed error (`mosaicdiff.method.step_allocation`).
2. **Calibrate**: per stage, clean data noised by the model's forward process to
   ``t ~ U[stage)`` (duplicated with the null condition for CFG); one pass of the dense model
   collects the input Hessians of every prunable group's consumer (a DiT block's ``proj`` and
   ``fc2``).
3. **Prune**: per block, greedy structured OBS removes heads and MLP channels (same ratio in
   every block) and compensates the consumers; widths are aligned.

Baselines share the code path: ``"uniform"`` (one OBS stage for all t at the target sparsity,
calibrated on t uniform over [0, T)), ``"magnitude"`` (one stage, least-norm groups dropped, no
compensation, no calibration needed) and ``"random"``.
"""

from __future__ import annotations

import logging
import operator
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mosaicdiff._version import __version__
from mosaicdiff.core import distributed
from mosaicdiff.core.stages import StageSpec
from mosaicdiff.method import compact, step_allocation
from mosaicdiff.method.calibrate import (
    ConditionedCalibration,
    collect_hessians,
    prepare_calibration,
    stage_inputs,
)
from mosaicdiff.method.stage_plan import METHODS, STEPWISE_S_MAX, check_fraction, default_s_max, plan_stages

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "PRUNERS", "default_s_max", "plan_stages", "prune_with_adapter", "stage_generator"]

#: Column-removal methods per stage (`mosaicdiff.method.compact.prune_group`).
PRUNERS = compact.METHODS
_DEFAULT_PRUNER = {"mosaic": "obs", "stepwise": "obs", "uniform": "obs", "magnitude": "magnitude", "random": "random"}
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


def _unit_trace(h: torch.Tensor) -> torch.Tensor:
    """`h` scaled to mean diagonal 1: stages whose activations are larger do not outvote the others."""
    return h / h.diagonal().mean().clamp_min(torch.finfo(h.dtype).tiny)


def _summed(hessians: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Per block and key, the sum of several stages' Hessians, each scaled to unit mean diagonal."""
    return [{key: sum(_unit_trace(h[i][key]) for h in hessians) for key in hessians[0][i]}
            for i in range(len(hessians[0]))]


def stage_generator(seed: int, stage_index: int) -> torch.Generator:
    """The generator of stage `stage_index`'s calibration draws (and random pruning): one per stage,
    so a stage's draws do not depend on which stages were pruned before it."""
    return torch.Generator().manual_seed(int(seed) * 1009 + int(stage_index))


def prune_with_adapter(model: nn.Module, adapter, calibration: ConditionedCalibration | None, target_sparsity: float, *,
                       pruner: str | None,
           method: str, boundaries, stage_sparsities, num_inference_steps: int, scheduler,
           samples_per_stage: int, speed_threshold: float, log_snr_weight: float, align: int | None, cfg: bool,
           batch_size: int, seed: int, progress: bool, s_max: float | None,
           groups_per_step: int, share_producers: bool, num_stages: int = step_allocation.DEFAULT_NUM_STAGES,
           exchange_rate: float = step_allocation.DEFAULT_EXCHANGE_RATE) -> tuple[list[StageSpec], dict[str, Any]]:
    """The pruned stages of `model` and the mosaic's ``meta``, the model seen through `adapter` only
    (`mosaicdiff.api.prune` finds the family and builds its mosaic from them)."""
    # 1. Validate.
    adapter.validate(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pruner = _DEFAULT_PRUNER[method] if pruner is None else pruner
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    target = check_fraction("target_sparsity", target_sparsity)
    if int(samples_per_stage) != samples_per_stage or samples_per_stage < 1:
        raise ValueError(f"samples_per_stage must be a positive integer, got {samples_per_stage!r}")
    if calibration is not None:
        # type, device, the adapter's checks (shape, keys, null class, NaN) before long work; the
        # family's default null conditions filled in; a calibration with cfg=False is never duplicated
        calibration = prepare_calibration(model, adapter, calibration, cfg=cfg)
        cfg = bool(cfg) and calibration.cfg
    align = _check_align(align)

    # 2. Divide: stages, step counts, sparsities (on the family's own schedule unless one is given).
    # `scheduler` may be a NoiseProcess: a flow scheduler with its mu (noise_process(scheduler, mu=...)).
    scheduler = adapter.default_scheduler() if scheduler is None else scheduler
    process = adapter.noise_process(model, scheduler, calibration)
    timesteps = process.sampler_timesteps(num_inference_steps)
    r = calibration.x0_sq_norm if calibration is not None else 1.0
    blocks = adapter.blocks(model)
    sensitivities, probe_seconds = None, 0.0
    if method == "stepwise" and stage_sparsities is None:
        # the allocation reads the model: probe each stage's error at the target (magnitude, no data)
        if calibration is None:
            raise ValueError("method='stepwise' probes the model on calibration data, got None")
        _check_widths([("probe", 0, 0, target)], adapter.groups(blocks[0]), align, None)
        windows = step_allocation.equal_step_stages(timesteps, num_stages, process.timestep_end)
        started = time.perf_counter()
        sensitivities = step_allocation.probe_errors(model, adapter, calibration, windows, target, process=process,
                                                     align=align, seed=seed, batch_size=batch_size)
        probe_seconds = time.perf_counter() - started
    planned, info = plan_stages(target, method=method, boundaries=boundaries, stage_sparsities=stage_sparsities,
                                alphas_cumprod=process, timesteps=timesteps, speed_threshold=speed_threshold,
                                log_snr_weight=log_snr_weight, x0_sq_norm=r, s_max=s_max, num_stages=num_stages,
                                sensitivities=sensitivities, exchange_rate=exchange_rate)
    if sensitivities is not None:
        info["probe_seconds"] = round(probe_seconds, 3)
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

    def calibrate(k: int) -> list[dict[str, torch.Tensor]]:
        name, t0, t1, _ = planned[k]
        x_t, t, condition = stage_inputs(calibration, t0, t1, int(samples_per_stage), cfg=cfg,
                                         generator=stage_generator(seed, k), alphas_cumprod=process)
        logger.info("stage %s [%d, %d): calibrating on %d inputs", name, t0, t1, x_t.shape[0])
        return collect_hessians(model, x_t, t, condition, batch_size=batch_size, progress=progress, adapter=adapter)

    # More than three nested stages form a chain (each keeps a subset of the one before), so a
    # stage's kept set must serve every stage after it: it is selected by OBS on the sum of their
    # (trace-normalised) Hessians and compensated on its own. On the digits DiT at ten stages the
    # chain costs 1.4 dB PSNR against free stages with each stage selecting on its own Hessian, 1.0
    # dB this way (docs/results.md). All K stages' Hessians are held at once for this.
    consensus = share_producers and len(planned) > 3 and pruner == "obs"
    pending = {k: calibrate(k) for k in order if planned[k][3] > 0} if consensus else {}
    remaining = _summed(list(pending.values())) if pending else None
    for rank, k in enumerate(order):
        name, t0, t1, sp = planned[k]
        generator = stage_generator(seed, k)
        parent = None
        if share_producers and rank > 0:
            parent = kept_sets[by_sparsity[0] if len(planned) <= 3 else order[rank - 1]]
        hessians = None
        if sp > 0 and pruner == "obs":
            hessians = pending.pop(k) if consensus else calibrate(k)
        compact_blocks, kept = [], []
        show = progress and distributed.is_main_process()
        for i, block in enumerate(tqdm(blocks, desc=f"pruning {name} (s={sp:.2f})", disable=not show, leave=False)):
            if sp == 0:
                compact_blocks.append(adapter.dense_block(block))
                kept.append(None)
                continue
            h = hessians[i] if hessians is not None else None
            within = parent[i] if parent is not None else None
            if remaining is not None:  # select for this stage and the ones after it, then compensate
                chosen = compact.prune_groups(adapter.groups(block), remaining[i], sp, method=pruner, align=align,
                                              keep_within=within, **obs_kwargs)
                within = {g: p.kept for g, p in chosen.items()}
                for key, value in h.items():
                    remaining[i][key] -= _unit_trace(value)  # the stages after this one
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
        "scheduler": type(process.scheduler if process.scheduler is not None else scheduler).__name__,
        "noise_process": process.describe(),
        "samples_per_stage": int(samples_per_stage) if needs_data else 0,
        "speed_threshold": float(speed_threshold), "log_snr_weight": float(log_snr_weight),
        "x0_sq_norm": float(r), "s_max": float(s_max if s_max is not None else
                                               STEPWISE_S_MAX if method == "stepwise" else default_s_max(target)),
        "align": None if align is None else int(align), "cfg": bool(cfg), "seed": int(seed),
        "groups_per_step": int(groups_per_step), "share_producers": bool(share_producers),
        "mosaicdiff_version": __version__,
    }
    return stages, meta
