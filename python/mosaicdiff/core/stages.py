"""The stages of a mosaic: the pruner's `StageSpec`, the checks that stage ranges tile the
trajectory, and the lookup of a timestep's stage.

A stage in a mosaic's config is ``{"name", "t_start", "t_end", "sparsity", "blocks": [...]}``,
each block entry the kept units of the family's compact block.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["NUM_TRAIN_TIMESTEPS", "StageSpec", "check_stage_ranges", "checked_stage_configs", "coverage_problem", "frozen",
           "stage_index"]

#: Default trajectory range [0, NUM_TRAIN_TIMESTEPS) (DiT's training schedule).
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class StageSpec:
    """One stage of the trajectory: timesteps t with t_start <= t < t_end use `blocks` (one
    compact block weights object per prunable block, of the family's own type)."""

    name: str
    t_start: int
    t_end: int
    sparsity: float  # requested structural sparsity of this stage's blocks
    blocks: list[Any] = field(default_factory=list)


def frozen(t: torch.Tensor) -> nn.Parameter:
    """`t` as an inference-only parameter (no grad; registered, so `.to()` and state dicts see it)."""
    return nn.Parameter(t.detach(), requires_grad=False)


def check_stage_ranges(stages: Sequence[dict], what: str = "the mosaic") -> None:
    """Each stage's ``[t_start, t_end)`` is non-empty and the ranges are contiguous (any order).

    Raises:
        ValueError: no stage, an empty range, an overlap or a gap (both stages named).
    """
    if not stages:
        raise ValueError(f"{what} needs at least one stage, got none")
    for s in stages:
        if not s["t_start"] < s["t_end"]:
            raise ValueError(f"stage {s['name']!r}: t_start must be < t_end, got [{s['t_start']}, {s['t_end']})")
    ordered = sorted(stages, key=lambda s: s["t_start"])  # the caller's order is kept for indexing
    for a, b in zip(ordered, ordered[1:]):
        if a["t_end"] != b["t_start"]:
            kind = "overlap" if a["t_end"] > b["t_start"] else "leave a gap"
            raise ValueError(
                f"stages {a['name']!r} [{a['t_start']}, {a['t_end']}) and {b['name']!r} "
                f"[{b['t_start']}, {b['t_end']}) {kind}; stage ranges must be contiguous"
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def coverage_problem(stages: Sequence[dict], meta: Any) -> str | None:
    """Why the stages do not tile [0, T) (every sampling step needs exactly one stage), or None.

    T is ``meta["num_train_timesteps"]`` (written by `mosaicdiff.prune`), else 1000, or 1001 when
    the stages end there (a flow scheduler's tiling: its first timestep is t = 1000 at sigma = 1).
    """
    T = meta.get("num_train_timesteps") if isinstance(meta, dict) else None
    if not (_is_int(T) and T > 0):
        flow = max((s["t_end"] for s in stages), default=0) == NUM_TRAIN_TIMESTEPS + 1
        T = NUM_TRAIN_TIMESTEPS + 1 if flow else NUM_TRAIN_TIMESTEPS
    spans = sorted(((s["t_start"], s["t_end"], s["name"]) for s in stages), key=lambda x: x[:2])
    need = f"the stages must cover [0, {T}) without gaps or overlaps"
    if spans[0][0] != 0:
        return f"stage {spans[0][2]!r} starts at t={spans[0][0]}, so t in [0, {spans[0][0]}) has no stage; {need}"
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if a1 != b0:
            kind = "overlap" if a1 > b0 else "leave a gap"
            return f"stages {a!r} [{a0}, {a1}) and {b!r} [{b0}, {b1}) {kind}; {need}"
    if spans[-1][1] != T:
        return f"the last stage {spans[-1][2]!r} ends at t={spans[-1][1]}, not at {T}; {need}"
    return None


def checked_stage_configs(owner: str, stages: Sequence[dict] | None, meta: Any) -> list[dict]:
    """A mosaic constructor's ``stages`` config as a list of dicts, after checking that `meta` is
    JSON-serialisable and that the stages tile the timesteps (`coverage_problem`).

    Raises:
        TypeError: a `meta` that is not JSON-serialisable.
        ValueError: no stages, or stages with a gap, an overlap or the wrong ends (`owner` named).
    """
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise TypeError(f"{owner}: meta must be JSON-serialisable, got {meta!r} ({exc})") from None
    stages = [dict(s) for s in stages or ()]
    problem = coverage_problem(stages, meta) if stages else "no stages"
    if problem:
        raise ValueError(f"{owner}: {problem}")
    return stages


def stage_index(ranges: Sequence[tuple[str, int, int, float]], t: float) -> int:
    """Index of the ``(name, t_start, t_end, sparsity)`` range with ``t_start <= t < t_end``.

    Raises:
        ValueError: if no range contains `t` (the ranges are listed).
    """
    for i, (_, t0, t1, _) in enumerate(ranges):
        if t0 <= t < t1:
            return i
    listed = ", ".join(f"{n}[{a},{b})" for n, a, b, _ in ranges)
    raise ValueError(f"timestep {t:g} is outside every stage: {listed}")
