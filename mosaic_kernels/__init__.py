"""mosaic_kernels: fused forward kernels for (pruned) diffusion transformer blocks.

Knows tensors and shapes, nothing about diffusion. Every op works on CPU through the plain
torch reference; the Triton kernels and the optional compiled CUDA extension are picked by
:mod:`mosaic_kernels.ops` when they can run. Every op is differentiable (fine-tuning, LoRA): the
kernels are forward kernels, and the backward of each custom op recomputes its torch reference
and differentiates that (:mod:`mosaic_kernels.ops._autograd`); ``attention`` differentiates
through SDPA. Gradients reach every floating tensor input; double backward is not supported.
"""

from . import ops
from .ops import *  # noqa: F403 - the registered ops and the backend controls

__all__ = list(ops.__all__)
