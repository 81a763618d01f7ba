"""Kernel timing: ``triton.testing.do_bench`` on CUDA, a plain timer only where it cannot run.

``do_bench`` flushes the L2 between runs and times with CUDA events. On the CPU (the dry runs,
the tests) it cannot run, so :func:`time_ms` falls back to a ``perf_counter`` loop with the
same quantiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["QUANTILES", "time_ms"]

#: Median, then the 20th and 80th percentiles (as Liger's benchmarks).
QUANTILES = (0.5, 0.2, 0.8)


def time_ms(fn: Callable[[], Any], device: torch.device | str, rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` on ``device``.

    Args:
        fn: the work to time (called at least a few times; its first call may compile).
        device: where ``fn`` runs: CUDA uses ``triton.testing.do_bench(fn, quantiles, rep)``.
        rep_ms: the timing window in milliseconds.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=list(QUANTILES), rep=rep_ms))
    fn()  # warm-up (compiles)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor(QUANTILES)).tolist()
    return q[0], q[1], q[2]
