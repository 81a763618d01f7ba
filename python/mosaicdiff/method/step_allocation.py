r"""K stages of equal step counts, each stage's sparsity from a probed sensitivity curve (``method="stepwise"``).

Issue 24's measurements on the embedded digits models said two things about the paper's three
closed-form stages (docs/results.md, "Where the digits models are fragile"):

- finer stages pay by themselves: ten stages at the same sparsity, each calibrated on its own
  narrow range of t, beat the three stages by 1.4-2.2 dB PSNR to dense on the digits DiT;
- the model is fragile where the learning-speed score says it is cheap: pruning one window of
  five DDIM steps at 0.6 costs 45-47 dB PSNR at high noise but 34 dB in the last five steps.

So the ``"stepwise"`` schedule cuts the sampler's steps into `num_stages` windows of equal step
counts (`equal_step_stages`) and gives each a sparsity from what pruning there costs, probed on the
model itself instead of read off the noise schedule:

1. **Probe** (`probe_errors`): per window, the mean squared change of the model's prediction on
   held-out noised calibration inputs of that window when every block loses the target fraction
   of its heads and MLP channels by magnitude (the removed units' consumer columns zeroed: no
   data, no Hessian, two forwards per window). On the digits DiT this one-step error tracks the
   measured per-window PSNR loss of the sensitivity experiment with a log-Pearson of 0.98.
2. **Allocate** (`allocate_exponential`): with a window's image error modelled as
   ``c_w exp(a s_w)`` (``c_w`` the probe, ``a`` the exchange rate of sparsity for error), the
   steps' summed error under the exact step-weighted mean ``sum_w n_w s_w = S sum_w n_w`` is least at
   ``s_w = clip((L - ln c_w) / a, 0, s_max)``, ``L`` set by the mean (bisection; closed form up to
   the clipping). A window ten times as sensitive gets ``ln(10) / a`` less sparsity.
3. **Prune** as every mosaic stage: OBS on the window's own calibration inputs, kept sets nested
   from the least to the most pruned window (`mosaicdiff.method.pruning`), so one producer storage
   serves all ``K`` stages and only the compensated consumers grow with ``K``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import stage_inputs

__all__ = ["DEFAULT_EXCHANGE_RATE", "DEFAULT_NUM_STAGES", "DEFAULT_PROBE_SAMPLES", "allocate_exponential",
           "equal_step_stages", "probe_errors"]

#: Stages of ``method="stepwise"`` (ten windows of five DDIM-50 steps).
DEFAULT_NUM_STAGES = 10
#: ``a`` in ``c exp(a s)``: how fast a window's error grows with its sparsity (see `allocate_exponential`).
DEFAULT_EXCHANGE_RATE = 7.0
#: Held-out noised inputs per window for the probe (before CFG duplication: none is made).
DEFAULT_PROBE_SAMPLES = 32


def equal_step_stages(timesteps, num_stages: int, timestep_end: int) -> list[tuple[str, int, int]]:
    """`num_stages` stages ``(name, t_start, t_end)`` holding equal numbers of the sampler's steps.

    The steps (any order) are sorted high t first and cut into `num_stages` runs (`numpy.array_split`:
    sizes differ by at most one); a cut lies halfway between the last step of one run and the
    first of the next (rounded up), and the stages tile ``[0, timestep_end)``. Names are ``"s0"``
    (the noisiest) to ``"s{K-1}"``.

    Raises:
        ValueError: unless ``1 <= num_stages <=`` the number of distinct steps.
    """
    ts = np.unique(np.asarray(torch.as_tensor(timesteps).detach().double().cpu()).reshape(-1))[::-1]
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) or not 1 <= num_stages <= ts.size:
        raise ValueError(f"num_stages must be an integer in [1, {ts.size}] (the sampler's steps), got {num_stages!r}")
    runs = np.array_split(ts, int(num_stages))
    cuts = [int(np.ceil((a[-1] + b[0]) / 2)) for a, b in zip(runs, runs[1:])]
    ends = [int(timestep_end)] + cuts
    starts = cuts + [0]
    return [(f"s{k}", starts[k], ends[k]) for k in range(int(num_stages))]


@contextlib.contextmanager
def _magnitude_pruned(groups_per_block: Sequence[dict[str, Any]], sparsity: float, align: int | None) -> Iterator[None]:
    """The dense model with every block's least-norm units removed, in place: a removed unit only
    reaches the block's output through its consumers' columns, so zeroing those columns is removing
    it. The weights are restored on exit (also on error)."""
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for groups in groups_per_block:
                pruned = compact.prune_groups(groups, None, sparsity, method="magnitude", align=align)
                for name, group in groups.items():
                    size = int(group.unit_size)
                    keep = torch.zeros(group.num_units, dtype=torch.bool)
                    keep[pruned[name].kept] = True
                    removed = (~keep).nonzero().reshape(-1)
                    cols = (group.columns.start + removed[:, None] * size + torch.arange(size)).reshape(-1)
                    for consumer in group.consumers:
                        if not any(c is consumer for c, _ in saved):
                            saved.append((consumer, consumer.weight.detach().clone()))
                        consumer.weight[:, cols.to(consumer.weight.device)] = 0
        yield
    finally:
        with torch.no_grad():
            for consumer, weight in saved:
                consumer.weight.copy_(weight)


def _prediction(output: Any, like: torch.Tensor) -> torch.Tensor:
    """The model's prediction tensor (a diffusers output, a tuple or a tensor), cut to the input's
    channels (DiT's learned-sigma variance channels are not sampled with)."""
    out = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, (tuple, list)) else output
    if out.dim() == 4 and like.dim() == 4 and out.shape[1] != like.shape[1]:
        out = out[:, : like.shape[1]]
    return out.float()


@torch.no_grad()
def probe_errors(model: nn.Module, adapter, calibration, stages: Sequence[tuple[str, int, int]], sparsity: float, *,
                 process, samples: int = DEFAULT_PROBE_SAMPLES, align: int | None = 64, seed: int = 0,
                 batch_size: int = 64) -> np.ndarray:
    """Per stage, the mean squared change of the prediction when every block is magnitude-pruned to
    `sparsity`, on `samples` noised calibration inputs of the stage's t range (conditional rows,
    drawn with their own generator: not the inputs the stage is later calibrated on).

    Returns:
        `numpy.ndarray` of shape ``(len(stages),)``, positive (floored at a tiny value so that its
        logarithm exists for a probe that changes nothing).
    """
    groups = [adapter.groups(block) for block in adapter.blocks(model)]
    errors = []
    for k, (_, t0, t1) in enumerate(stages):
        x_t, t, condition = stage_inputs(calibration, t0, t1, int(samples), cfg=False,
                                         generator=torch.Generator().manual_seed(int(seed) * 7919 + 104729 + k),
                                         alphas_cumprod=process)
        total, count = 0.0, 0
        for lo in range(0, x_t.shape[0], int(batch_size)):
            rows = slice(lo, lo + int(batch_size))
            cond = {key: (v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x_t.shape[0] else v)
                    for key, v in condition.items()}
            dense = _prediction(adapter.run(model, x_t[rows], t[rows], cond), x_t)
            with _magnitude_pruned(groups, sparsity, align):
                pruned = _prediction(adapter.run(model, x_t[rows], t[rows], cond), x_t)
            total += float(((pruned - dense) ** 2).sum())
            count += dense.numel()
        errors.append(total / max(count, 1))
    return np.maximum(np.asarray(errors, dtype=np.float64), 1e-30)


def allocate_exponential(errors: Sequence[float], steps: Sequence[int], target: float, *,
                         rate: float = DEFAULT_EXCHANGE_RATE, s_max: float = 0.8) -> list[float]:
    """Sparsities ``s_w`` minimising ``sum_w n_w c_w exp(rate * s_w)`` under ``sum_w n_w s_w = target * sum_w n_w``
    and ``0 <= s_w <= s_max``: ``s_w = clip((L - ln c_w) / rate, 0, s_max)`` with ``L`` found by bisection.

    Args:
        errors: ``c_w > 0`` per stage (`probe_errors`).
        steps: the sampler's steps ``n_w`` per stage (a stage with none takes ``s_max``: it never runs).
        target: the step-weighted mean sparsity, in ``[0, s_max]``.
        rate: the exchange rate ``a > 0``; larger is closer to uniform.
        s_max: the largest sparsity a stage may get.

    Raises:
        ValueError: mismatched lengths, non-positive errors or rate, or a target above `s_max`.
    """
    c = np.asarray(errors, dtype=np.float64)
    n = np.asarray(steps, dtype=np.float64)
    if c.shape != n.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"errors and steps must be two equal-length 1-D sequences, got {c.shape} and {n.shape}")
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise ValueError(f"errors must be finite and positive, got {c.tolist()}")
    if not rate > 0 or not np.isfinite(rate):
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    if not 0 <= target <= s_max < 1:
        raise ValueError(f"need 0 <= target <= s_max < 1, got target={target!r}, s_max={s_max!r}")
    if n.sum() <= 0:
        raise ValueError("no stage holds a sampler step")
    log_c = np.log(c)

    def sparsities(level: float) -> np.ndarray:
        return np.where(n > 0, np.clip((level - log_c) / rate, 0.0, s_max), s_max)

    def mean(level: float) -> float:
        return float((n * sparsities(level)).sum() / n.sum())

    lo, hi = float(log_c.min()) - 1.0, float(log_c.max()) + rate * s_max + 1.0  # mean 0 .. mean s_max
    for _ in range(200):  # mean(level) is continuous and non-decreasing in level
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return [float(v) for v in sparsities(0.5 * (lo + hi))]
