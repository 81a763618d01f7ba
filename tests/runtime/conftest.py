"""Fixtures of the runtime tests (helpers live in `dit_helpers.py`).

The kernel ops run on the torch reference backend here (fast on CPU); tests marked
``auto_backend`` go through the default dispatch (the Triton interpreter on CPU when enabled).
"""

from __future__ import annotations

import pytest

from tests.runtime.dit_helpers import tiny_dit


@pytest.fixture(autouse=True)
def _torch_backend(request):
    """Pin the fast torch reference backend unless a test is marked `auto_backend`."""
    from mosaic_kernels import ops

    if request.node.get_closest_marker("auto_backend"):
        yield
        return
    with ops.use_backend("torch"):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "auto_backend: run the kernel ops through the default dispatch")


@pytest.fixture(params=[True, False], ids=["shared-emb", "per-block-emb"])
def dense(request):
    return tiny_dit(out_channels=8, identical_embedders=request.param)
