"""Pruned stages for the schedule search, each (stage, sparsity) calibrated and OBS-pruned at most once.

A search evaluates hundreds of schedules that reuse the same few (stage, sparsity) pairs, so
`StagePruneCache` keeps what they cost:

- per stage, the dense model's input Hessians on that stage's own calibration inputs
  (`mosaicdiff.method.calibrate.stage_inputs` with the stage's `mosaicdiff.method.pruning.stage_generator`,
  then `mosaicdiff.method.calibrate.collect_hessians`): one pass per stage, on first use;
- per stage and removal, the compact blocks (`mosaicdiff.method.compact.prune_groups` and the model's
  adapter, as `mosaicdiff.prune` does). Sparsities that remove the same number of heads and MLP
  channels (the MLP width is aligned, heads are whole) give the same blocks, so they are keyed
  by those counts and pruned once.

Memory: the Hessians of every stage are kept (float64, ``in_features^2`` per consumer and block:
about 30 MB per stage for the embedded digits DiT, but some GB per stage at DiT-XL/2 size, where
the levels of a stage should rather be pruned together and the Hessians dropped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.stages import StageSpec
from mosaicdiff.families import family_for
from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import (
    ConditionedCalibration,
    collect_hessians,
    prepare_calibration,
    resolve_alphas_cumprod,
    stage_inputs,
)
from mosaicdiff.method.pruning import stage_generator

logger = logging.getLogger(__name__)

__all__ = ["StagePruneCache"]

Stage = tuple[str, int, int]


class StagePruneCache:
    """The compact blocks of any (stage, sparsity), computed once.

    Args:
        model (`nn.Module`): the dense model (a family `mosaicdiff.families.family_for` knows).
        calibration (`ConditionedCalibration`): clean data on the model's device (`Calibration` for a DiT).
        stages (`list[tuple[str, int, int]]`): ``(name, t_start, t_end)`` per stage.
        samples_per_stage (`int`): calibration samples per stage (x2 with `cfg`).
        cfg (`bool`): calibrate both classifier-free-guidance branches.
        batch_size (`int`): calibration batch size.
        seed (`int`): calibration draws: stage ``i`` uses ``stage_generator(seed, i)``.
        align (`int`, *optional*): MLP width alignment (`mosaicdiff.method.compact.mlp_width`).
        groups_per_step (`int`): MLP channels removed per OBS iteration.
        alphas_cumprod (*optional*): the training schedule (array or scheduler).
        progress (`bool`): tqdm bars of the calibration passes.

    Raises:
        ValueError: a model no adapter handles, calibration that does not fit it, a bad
            `samples_per_stage`.
    """

    def __init__(self, model: nn.Module, calibration: ConditionedCalibration, stages: Sequence[Stage], *,
                 samples_per_stage: int = 128, cfg: bool = True, batch_size: int = 64, seed: int = 0,
                 align: int | None = 64, groups_per_step: int = 1, alphas_cumprod=None, progress: bool = False):
        family = family_for(model)
        self.adapter = family.adapter
        self.adapter.validate(model)
        if calibration is None or len(calibration) == 0:
            raise ValueError("the schedule search prunes with OBS and needs calibration data, got none")
        calibration = prepare_calibration(model, self.adapter, calibration, cfg=cfg)  # as mosaicdiff.prune
        cfg = bool(cfg) and calibration.cfg
        if int(samples_per_stage) != samples_per_stage or samples_per_stage < 1:
            raise ValueError(f"samples_per_stage must be a positive integer, got {samples_per_stage!r}")
        self.model = model
        self.calibration = calibration
        self.stages = [(str(n), int(t0), int(t1)) for n, t0, t1 in stages]
        self.blocks = self.adapter.blocks(model)
        self._groups = self.adapter.groups(self.blocks[0])
        self._settings = dict(samples_per_stage=int(samples_per_stage), cfg=bool(cfg), batch_size=int(batch_size),
                              seed=int(seed), align=align, groups_per_step=int(groups_per_step))
        self._abar = resolve_alphas_cumprod(alphas_cumprod)
        self._progress = progress
        self._hessians: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._pruned: dict[tuple[int, tuple[int, ...]], list[Any]] = {}
        #: Calibration passes run, and (stage, removal) prunings run: each at most once.
        self.hessian_passes = 0
        self.prune_calls = 0
        self.seconds = {"calibration": 0.0, "pruning": 0.0}  # where the cache's time went
        self.requests: set[tuple[int, float]] = set()

    def removal(self, sparsity: float) -> tuple[int, ...]:
        """Units each group of a block loses at `sparsity` (the cache key within a stage).

        Raises:
            ValueError: a sparsity outside [0, 1) or one that removes every head.
        """
        align = self._settings["align"]
        return tuple(compact.units_to_remove(g, sparsity, align) for g in self._groups.values())

    def stage_blocks(self, index: int, sparsity: float) -> list[Any]:
        """The compact blocks of stage `index` pruned to `sparsity` (cached; do not modify them)."""
        if not 0 <= index < len(self.stages):
            raise ValueError(f"stage index must be in [0, {len(self.stages)}), got {index!r}")
        self.requests.add((int(index), float(sparsity)))
        key = (int(index), self.removal(sparsity))
        if key not in self._pruned:
            self._pruned[key] = self._prune(index, sparsity, key[1])
        return self._pruned[key]

    def stage_spec(self, index: int, sparsity: float) -> StageSpec:
        """Stage `index` at `sparsity` as a `StageSpec` (its blocks shared with the cache)."""
        name, t0, t1 = self.stages[index]
        return StageSpec(name, t0, t1, float(sparsity), self.stage_blocks(index, sparsity))

    def widths(self, index: int, sparsity: float) -> dict[str, float]:
        """The adapter's widths (kept heads, MLP width and their sparsities) of a cached stage."""
        return self.adapter.block_widths(self.blocks[0], self.stage_blocks(index, sparsity)[0])

    def stats(self) -> dict[str, int | float]:
        """How much work the cache did and saved, and its seconds (JSON-ready)."""
        return {"hessian_passes": self.hessian_passes, "prune_calls": self.prune_calls,
                "stage_level_requests": len(self.requests), "cached_stage_removals": len(self._pruned),
                "calibration_seconds": round(self.seconds["calibration"], 3),
                "pruning_seconds": round(self.seconds["pruning"], 3)}

    def _prune(self, index: int, sparsity: float, removal: tuple[int, ...]) -> list[Any]:
        if not any(removal):  # nothing to remove: the dense blocks, no calibration needed
            return [self.adapter.dense_block(b) for b in self.blocks]
        hessians = self._stage_hessians(index)
        started = time.perf_counter()
        s = self._settings
        out = []
        for block, h in zip(self.blocks, hessians):
            pruned = compact.prune_groups(self.adapter.groups(block), h, sparsity, method="obs", align=s["align"],
                                          groups_per_step=s["groups_per_step"])
            out.append(self.adapter.compact_block(block, pruned))
        self.prune_calls += 1
        self.seconds["pruning"] += time.perf_counter() - started
        logger.debug("stage %s at sparsity %.3f: removed %s", self.stages[index][0], sparsity, removal)
        return out

    def _stage_hessians(self, index: int) -> list[dict[str, torch.Tensor]]:
        if index not in self._hessians:
            started = time.perf_counter()
            name, t0, t1 = self.stages[index]
            s = self._settings
            x_t, t, condition = stage_inputs(self.calibration, t0, t1, s["samples_per_stage"], cfg=s["cfg"],
                                             generator=stage_generator(s["seed"], index), alphas_cumprod=self._abar)
            self._hessians[index] = collect_hessians(self.model, x_t, t, condition, batch_size=s["batch_size"],
                                                     progress=self._progress, adapter=self.adapter)
            self.hessian_passes += 1
            self.seconds["calibration"] += time.perf_counter() - started
            logger.info("stage %s [%d, %d): Hessians from %d inputs", name, t0, t1, x_t.shape[0])
        return self._hessians[index]
