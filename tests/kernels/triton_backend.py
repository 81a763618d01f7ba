"""The Triton launchers for the kernel tests that call them directly, or a skip with the reason."""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk


def triton_or_skip():
    """``(mosaic_kernels.triton, device)``: the launchers and the device they run on here (CUDA, or
    the CPU through the interpreter); skips when the Triton backend is not available."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    return triton_kernels, device
