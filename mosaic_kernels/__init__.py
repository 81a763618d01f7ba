"""mosaic_kernels: fused forward kernels for (pruned) diffusion transformer blocks.

Knows tensors and shapes, nothing about diffusion. Every op works on CPU through the plain
torch reference; the Triton kernels and the optional compiled CUDA extension are picked by
:mod:`mosaic_kernels.ops` when they can run. All ops are forward-only.
"""

from . import ops
from .ops import *  # noqa: F403 - the registered ops and the backend controls

__all__ = list(ops.__all__)
