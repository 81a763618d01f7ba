"""The stage choice of a mosaic's forward as ``torch.compile(mosaic, fullgraph=True)`` traces it.

Eagerly a mosaic reads the timestep on the host and runs one stage's blocks
(`mosaicdiff.core.model.MosaicModel.stage_rows`); a traced graph cannot read a tensor's value,
so under ``torch.compile`` the choice is made in the graph instead:

- a Python number: the stage is chosen in Python on the (symbolic) value, so the graph is
  guarded by the stage's range, not by the value: one graph per stage once dynamo has made the
  value dynamic (``torch.compile(..., dynamic=True)`` from the first call; by default dynamo
  specialises the first value and makes it dynamic at the second);
- a tensor (0-d, (1,) or (B,), on any device): the stage index is computed on the device and
  ``torch.cond`` picks the stage's branch (every stage has the same output shape): one graph
  holding every stage, never recompiled as the timestep moves. A batch whose rows fall in several
  stages takes a branch that runs every stage and keeps each row's own output (correct, slower;
  eagerly only the stages present run). A value outside every stage fails an in-graph assert
  (``RuntimeError``; eagerly a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mosaicdiff.core.stages import stage_index

__all__ = ["run_stage_traced", "stage_of_rows"]

#: ``(t_vec) -> output`` of one stage, ``t_vec`` the (B,) float32 timesteps on the inputs' device.
StageFn = Callable[[torch.Tensor], torch.Tensor]


def stage_of_rows(ranges: Sequence[tuple[str, int, int, float]], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage index of every row of `t` (int64, same shape) and whether every row is in one
    stage range (a 0-d bool tensor), computed on `t`'s device without a host read."""
    inside = torch.stack([(t >= t0) & (t < t1) for _, t0, t1, _ in ranges])  # (S, B)
    index = torch.arange(len(ranges), device=t.device).view(-1, *([1] * t.dim()))
    return (inside.long() * index).sum(0), (inside.long().sum(0) == 1).all()


def _by_index(stage: torch.Tensor, fns: Sequence[StageFn], first: int, t_vec: torch.Tensor) -> torch.Tensor:
    """``fns[stage - first](t_vec)`` as a chain of ``torch.cond`` (`stage` a 0-d int64 tensor)."""
    if len(fns) == 1:
        return fns[0](t_vec)
    return torch.cond(stage == first, lambda t: fns[0](t),
                      lambda t: _by_index(stage, fns[1:], first + 1, t), (t_vec,))


def _every_stage(rows: torch.Tensor, fns: Sequence[StageFn], t_vec: torch.Tensor) -> torch.Tensor:
    """Each row's output from its own stage, every stage run on the whole batch (a mixed batch)."""
    out = None
    for s, fn in enumerate(fns):
        part = fn(t_vec)
        keep = (rows == s).view(-1, *([1] * (part.dim() - 1)))
        out = torch.where(keep, part, torch.zeros_like(part) if out is None else out)
    return out


def run_stage_traced(model, timestep, batch: int, device: torch.device,
                     run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run(stage, t_vec)`` for the stage of `timestep`, traceable by ``torch.compile(fullgraph=True)``.

    Args:
        model (`MosaicModel`): the mosaic (its stage ranges).
        timestep: a Python number or a tensor with 1 or `batch` values.
        batch (`int`): rows of the forward.
        device (`torch.device`): where the forward runs.
        run: ``(stage, t_vec)`` -> the stage's output for the whole batch, ``t_vec`` (B,) float32 on
            `device`; it reads the other inputs from its closure (``torch.cond`` lifts them).

    Raises:
        ValueError: a number outside every stage; a tensor with neither 1 nor `batch` values.
    """
    if not isinstance(timestep, torch.Tensor):
        stage = stage_index(model._ranges, timestep)  # guards on the stage's range
        return run(stage, torch.full((batch,), timestep, dtype=torch.float32, device=device))
    if timestep.numel() not in (1, batch):
        raise ValueError(f"timestep must be a number or have 1 or {batch} entries (one per row), "
                         f"got shape {tuple(timestep.shape)}")
    t_vec = timestep.detach().reshape(-1).to(device=device, dtype=torch.float32).expand(batch).contiguous()
    fns = [lambda t, s=s: run(s, t) for s in range(model.num_stages)]
    if len(fns) == 1:
        return fns[0](t_vec)
    rows, covered = stage_of_rows(model._ranges, t_vec)
    torch._assert_async(covered, "mosaic forward: a timestep is outside every stage")
    return torch.cond((rows == rows[0]).all(), lambda t: _by_index(rows[0], fns, 0, t),
                      lambda t: _every_stage(rows, fns, t), (t_vec,))
