"""mosaic_kernels: fused forward kernels for (pruned) diffusion transformer blocks.

Knows tensors and shapes, nothing about diffusion. Every op works on CPU through the plain
torch reference; the Triton kernels and the optional compiled CUDA extension are picked by
:mod:`mosaic_kernels.ops` when they can run. All ops are forward-only.
"""

from .ops import (
    attention,
    backends,
    current_backend,
    gated_residual,
    gated_residual_ln_modulate,
    linear_gated_residual,
    linear_gelu,
    ln_modulate,
    select_backend,
    use_backend,
)

__all__ = [
    "attention",
    "backends",
    "current_backend",
    "gated_residual",
    "gated_residual_ln_modulate",
    "linear_gated_residual",
    "linear_gelu",
    "ln_modulate",
    "select_backend",
    "use_backend",
]
