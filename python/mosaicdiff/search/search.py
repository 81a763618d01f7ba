r"""A searched-schedule baseline (Diff-ES style): N uniform stages, sparsities found by evolution.

MosaicDiff derives three stages and their sparsities in closed form (`mosaicdiff.prune`). The
baseline here asks what a search would find with the same budget: ``N`` equal stages over
``[0, T)`` (default 10), one sparsity per stage on a grid (default steps of 0.05, each stage in
``[0, s_cap]``), with the same step-weighted mean sparsity as the target, chosen by a
(mu + lambda) evolution strategy (`mosaicdiff.search.es`) that maximises a held-out
fidelity: the mean PSNR of the candidate's samples to the dense model's samples on noises and
labels of their own seed (`mosaicdiff.search.fitness`). Each stage is pruned like a
MosaicDiff stage, with structured OBS on that stage's own calibration inputs; every (stage,
sparsity) is calibrated and pruned at most once (`mosaicdiff.search.cache`).

Examples:
    >>> import torch
    >>> from diffusers import DiTTransformer2DModel
    >>> from mosaicdiff.method.calibrate import Calibration
    >>> from mosaicdiff.search.search import search_schedule
    >>> from mosaicdiff.search.es import EvolutionConfig
    >>> dense = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    >>> calib = Calibration(torch.randn(8, 4, 8, 8), torch.arange(8) % 10, null_class=10)
    >>> mosaic, log = search_schedule(dense, calib, 0.2, num_stages=2, grid=0.1, s_cap=0.4,
    ...                               evolution=EvolutionConfig(population=2, offspring=2, generations=1),
    ...                               num_inference_steps=4, fitness_images=2, samples_per_stage=4,
    ...                               align=None, progress=False)
    >>> mosaic.num_stages, round(log["mean_sparsity"], 6)
    (2, 0.2)
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from mosaicdiff._version import __version__
from mosaicdiff.core.schedulers import sampler_timesteps
from mosaicdiff.families import family_for
from mosaicdiff.method.calibrate import ConditionedCalibration, resolve_alphas_cumprod
from mosaicdiff.method.schedule import steps_per_stage
from mosaicdiff.method.stage_plan import check_fraction
from mosaicdiff.search.cache import StagePruneCache
from mosaicdiff.search.es import EvolutionConfig, Levels, SparsityGrid, evolve
from mosaicdiff.search.fitness import HeldOutFidelity

__all__ = ["DEFAULT_GRID", "DEFAULT_NUM_STAGES", "DEFAULT_S_CAP", "search_schedule", "uniform_stages"]

DEFAULT_NUM_STAGES = 10
DEFAULT_GRID = 0.05
#: Largest sparsity a stage may get. Wider than MosaicDiff's target + 0.1 on purpose: the search
#: is free to find extreme schedules if they score better; 0.8 keeps 1 of 6 heads on the digits DiT.
DEFAULT_S_CAP = 0.8


def uniform_stages(num_stages: int, num_train_timesteps: int = 1000) -> list[tuple[str, int, int]]:
    """`num_stages` contiguous stages ``(name, t_start, t_end)`` of (nearly) equal length, high t first.

    Boundaries are ``round(k * T / N)``; names are ``"t{t_start}-{t_end}"``.

    Raises:
        ValueError: unless ``1 <= num_stages <= num_train_timesteps`` (integers).
    """
    try:
        n = None if isinstance(num_stages, bool) else operator.index(num_stages)
    except TypeError:
        n = None
    T = int(num_train_timesteps)
    if n is None or not 1 <= n <= T:
        raise ValueError(f"num_stages must be an integer in [1, {T}], got {num_stages!r}")
    edges = [round(k * T / n) for k in range(n + 1)]
    return [(f"t{edges[k]}-{edges[k + 1]}", edges[k], edges[k + 1]) for k in reversed(range(n))]


def _check_cap(cache: StagePruneCache, s_cap_level: float) -> None:
    """The largest grid sparsity must keep a head; said in the search's own terms."""
    try:
        cache.removal(s_cap_level)
    except ValueError as exc:
        raise ValueError(f"s_cap allows stage sparsity {s_cap_level:g}, which the model cannot take ({exc}); "
                         f"use a lower s_cap") from None


def search_schedule(model: nn.Module, calibration: ConditionedCalibration, target_sparsity: float = 0.5, *,
                    num_stages: int = DEFAULT_NUM_STAGES, grid: float = DEFAULT_GRID, s_cap: float = DEFAULT_S_CAP,
                    evolution: EvolutionConfig | None = None, num_inference_steps: int = 50, scheduler=None,
                    fitness: Callable[[nn.Module], float] | None = None, fitness_images: int = 32,
                    fitness_seed: int = 1000, fitness_steps: int | None = None, guidance_scale: float = 1.5,
                    samples_per_stage: int = 128, cfg: bool = True, batch_size: int = 64, align: int | None = 64,
                    groups_per_step: int = 1, seed: int = 0, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Searches per-stage sparsities of `num_stages` uniform stages and returns the best mosaic.

    Args:
        model (`DiTTransformer2DModel`): the dense model (left unchanged).
        calibration (`ConditionedCalibration`): clean data on the model's device (as for `mosaicdiff.prune`;
            `Calibration` for a DiT).
        target_sparsity (`float`): step-weighted mean sparsity of every candidate, a multiple of `grid`.
        num_stages (`int`): equal stages over ``[0, T)`` (`uniform_stages`); each needs a sampler step.
        grid (`float`): spacing of the per-stage sparsities, in (0, 1).
        s_cap (`float`): largest per-stage sparsity, in [target, 1).
        evolution (`EvolutionConfig`, *optional*): search budget and seed (default `EvolutionConfig()`).
        num_inference_steps (`int`): sampler steps of the evaluation; they weigh the mean sparsity.
        scheduler (*optional*): the sampler (default: the model family's, DDIM for a DiT).
        fitness (*optional*): candidate mosaic -> score (higher is better), replacing the held-out
            PSNR (`HeldOutFidelity`) built from the next four arguments.
        fitness_images (`int`): held-out noises and labels of the default fitness.
        fitness_seed (`int`): their seed; keep it apart from the seeds the result is evaluated on.
        fitness_steps (`int`, *optional*): sampler steps of the fitness (default `num_inference_steps`).
        guidance_scale (`float`): classifier-free guidance of the fitness's samples.
        samples_per_stage, cfg, batch_size, align, groups_per_step, seed: the calibration and
            OBS settings of `mosaicdiff.prune` (`seed` seeds the calibration draws).
        progress (`bool`): tqdm bars.

    Returns:
        ``(mosaic, log)``: the best candidate as the family's mosaic (`MosaicDiT` for a DiT;
        producers shared only where the stages' kept sets nest) with ``meta["method"] ==
        "searched"``, and a JSON-ready log: the settings, steps per stage, the best per-stage
        sparsities, their step-weighted mean (nominal and as realised by the kept widths),
        the fitness of the best and of the uniform schedule (every stage at the target), per
        generation the best fitness, evaluations and seconds so far, the cache's counts and the
        total seconds (calibration, pruning, the dense reference and the search).

    Raises:
        ValueError: a bad `num_stages` (or a stage without a sampler step), `grid`, `target_sparsity`
            (outside [0, 1), off the grid, above `s_cap`), `s_cap` (outside (0, 1), or removing
            every head), bad fitness settings, or a model or calibration `mosaicdiff.prune` refuses.
    """
    started = time.perf_counter()
    target = check_fraction("target_sparsity", target_sparsity)
    evolution = evolution if evolution is not None else EvolutionConfig()
    if not isinstance(evolution, EvolutionConfig):
        raise TypeError(f"evolution must be a mosaicdiff.search.es.EvolutionConfig, "
                        f"got {type(evolution).__name__}")
    family = family_for(model)
    scheduler = family.adapter.default_scheduler() if scheduler is None else scheduler
    abar = resolve_alphas_cumprod(scheduler)
    stages = uniform_stages(num_stages, abar.numel())
    steps = steps_per_stage(sampler_timesteps(num_inference_steps, scheduler), stages)
    empty = [name for name, count in steps.items() if count == 0]
    if empty:
        raise ValueError(f"num_stages={num_stages} leaves stage(s) {empty} without a step of the "
                         f"{num_inference_steps}-step sampler, so their sparsity would not count in the mean; "
                         f"use fewer stages or more steps")
    sparsity_grid = SparsityGrid.create([steps[name] for name, _, _ in stages], target, grid, s_cap)
    cache = StagePruneCache(model, calibration, stages, samples_per_stage=samples_per_stage, cfg=cfg,
                            batch_size=batch_size, seed=seed, align=align, groups_per_step=groups_per_step,
                            alphas_cumprod=abar, progress=progress)
    _check_cap(cache, sparsity_grid.sparsities([sparsity_grid.max_level])[0])
    if fitness is None:
        fitness = HeldOutFidelity.from_dense(
            model, fitness_images, seed=fitness_seed, guidance_scale=guidance_scale, scheduler=scheduler,
            num_inference_steps=num_inference_steps if fitness_steps is None else fitness_steps, progress=progress)
    source = family.adapter.source_name(model)

    def build(levels: Levels, share_producers: bool | None, meta: dict | None = None) -> nn.Module:
        specs = [cache.stage_spec(i, s) for i, s in enumerate(sparsity_grid.sparsities(levels))]
        return family.mosaic_class.from_dense(model, specs, source=source, meta=meta,
                                              share_producers=share_producers)

    # candidates are scored without shared producer storage (same outputs, no layout check)
    result = evolve(lambda levels: fitness(build(levels, False)), sparsity_grid, evolution, progress=progress)
    best = sparsity_grid.sparsities(result.best)
    realized = _realized_mean(cache, best, [steps[name] for name, _, _ in stages])
    log = {
        "method": "searched", "target_sparsity": target, "num_stages": len(stages),
        "stages": [[name, t0, t1] for name, t0, t1 in stages], "steps_per_stage": dict(steps),
        "grid": sparsity_grid.step, "s_cap": float(s_cap), "stage_sparsities": best,
        "mean_sparsity": sparsity_grid.mean_sparsity(result.best), "realized_mean_sparsity": realized,
        "stage_widths": {name: cache.widths(i, s) for i, ((name, _, _), s) in enumerate(zip(stages, best))},
        "fitness": fitness.describe() if hasattr(fitness, "describe") else {"metric": getattr(fitness, "__name__", "custom")},
        "evolution": vars(evolution).copy(), "best_fitness": result.best_fitness,
        "uniform_fitness": result.fitness_by_levels[sparsity_grid.uniform()],  # every stage at the target
        "evaluations": result.evaluations, "search_seconds": round(result.seconds, 3),
        "generations": [{**entry, "best_sparsities": sparsity_grid.sparsities(entry["best_levels"])}
                        for entry in result.log],
        "cache": cache.stats(), "num_inference_steps": int(num_inference_steps),
        "samples_per_stage": int(samples_per_stage), "cfg": bool(cfg), "align": align, "seed": int(seed),
        "groups_per_step": int(groups_per_step), "mosaicdiff_version": __version__,
    }
    meta = {k: log[k] for k in ("method", "target_sparsity", "num_stages", "steps_per_stage", "grid", "s_cap",
                                "stage_sparsities", "mean_sparsity", "realized_mean_sparsity", "fitness",
                                "evolution", "best_fitness", "evaluations", "seed", "mosaicdiff_version")}
    mosaic = build(result.best, None, meta)
    log["shared_producers"] = mosaic.config.get("shared_producers") is not None
    log["seconds"] = round(time.perf_counter() - started, 3)
    return mosaic, log


def _realized_mean(cache: StagePruneCache, sparsities: Sequence[float], weights: Sequence[int]) -> dict[str, float]:
    """Step-weighted mean of each realised width sparsity (heads and MLP move in whole units)."""
    widths = [cache.widths(i, s) for i, s in enumerate(sparsities)]
    keys = [k for k in widths[0] if k.endswith("_sparsity")]
    total = sum(weights)
    return {k: sum(w * wd[k] for w, wd in zip(weights, widths)) / total for k in keys}
