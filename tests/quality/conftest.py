"""Fixtures of the quality tests (embedded model, metrics, sampler, demo).

The kernel ops run on the fast torch reference backend here: the demo and sampler tests measure
the pipeline, not the kernels (those are tested against the reference in tests/kernels).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_backend():
    from mosaic_kernels import ops

    with ops.use_backend("torch"):
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these tests on one intra-op thread.

    The models are tiny (16 tokens of width 192), so a second thread gains little, while on a
    shared 2-core machine OpenMP barriers under oversubscription cost 10-20x: sampling 8 images
    for 5 steps took 11 s with 2 threads and 0.5 s with 1 (load average 5, measured here).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
