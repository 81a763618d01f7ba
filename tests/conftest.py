"""Shared pytest setup: run Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET is read when a kernel is decorated (at import of mosaic_kernels.triton), so it
is set here, before any test module imports kernels. An explicit value in the environment wins.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
