"""Bootstrap confidence intervals for image-set metrics (FID, accuracy, PSNR), single and paired.

A metric is a function of the indices of the images it is computed on, so one resampling routine
serves per-image means (PSNR, accuracy) and set statistics (FID). Paired intervals resample the
same indices for both methods: both were sampled from the same noise and labels, so the pairing
removes the seed noise that they share.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["Interval", "bootstrap", "paired_difference"]

#: Resamples of `bootstrap` (the percentile ends of a 95% interval move by < 1% of its width
#: between 1000 and 2000 resamples for the metrics here).
DEFAULT_RESAMPLES = 1000


class Interval(dict):
    """``{"value", "low", "high", "level"}``: a statistic and its percentile bootstrap interval."""

    def __init__(self, value: float, low: float, high: float, level: float):
        super().__init__(value=float(value), low=float(low), high=float(high), level=float(level))

    @property
    def excludes_zero(self) -> bool:
        return self["low"] > 0 or self["high"] < 0

    def __str__(self) -> str:
        return f"{self['value']:.3g} [{self['low']:.3g}, {self['high']:.3g}]"


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def _check(n: int, level: float, resamples: int) -> None:
    if n < 2:
        raise ValueError(f"bootstrap needs at least 2 samples, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 10:
        raise ValueError(f"resamples must be at least 10, got {resamples}")


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, level: float = 0.95,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """The statistic on all `n` samples and its percentile interval over resampled index sets.

    Args:
        statistic: maps an index array (into the samples) to a number, e.g.
            ``lambda idx: psnr[idx].mean()`` or ``lambda idx: fid(features[idx])``.
        n: number of samples.
        level: coverage of the interval.
        resamples: bootstrap resamples (with replacement, each of size `n`).
        seed: of the resampling.
    """
    _check(n, level, resamples)
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    return Interval(statistic(np.arange(n)), *_percentiles(draws, level), level)


def paired_difference(statistic_a: Callable[[np.ndarray], float], statistic_b: Callable[[np.ndarray], float],
                      n: int, *, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> Interval:
    """``a - b`` and its interval, both statistics evaluated on the same resampled indices."""
    _check(n, level, resamples)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        draws.append(statistic_a(idx) - statistic_b(idx))
    full = np.arange(n)
    return Interval(statistic_a(full) - statistic_b(full), *_percentiles(np.array(draws), level), level)
