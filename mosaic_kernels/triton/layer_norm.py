"""Affine LayerNorm: ``y = LN(x) * weight + bias`` over the last dim (SDXL's transformer norms).

The launcher of :func:`._norm_rows._norm_rows_kernel` (the row kernel shared with
``ln_modulate`` and ``gated_residual_ln_modulate``) with the weight and bias as vectors of row
stride 0: every row reads the same (D,) vectors. ``weight``/``bias`` may be None
(``nn.LayerNorm(elementwise_affine=False)`` or ``bias=False``).

References:
    Triton tutorial 05 (layer norm); Liger-Kernel ``ops/layer_norm.py``.
"""

from __future__ import annotations

import torch

from ._norm_rows import launch_norm_rows


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the shared LayerNorm row kernel.

    Args:
        x: (..., D) contiguous input.
        weight: (D,) contiguous weight, or None.
        bias: (D,) contiguous bias, or None.
        eps: variance epsilon.
        out: optional contiguous output of ``x``'s shape and dtype.
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default
            :func:`.settings.row_settings`.

    Returns:
        ``out``, the shape and dtype of ``x``.
    """
    assert x.dim() >= 1 and x.is_contiguous(), "layer_norm_triton: x must be contiguous"
    D = x.shape[-1]
    for v in (weight, bias):
        assert v is None or (v.shape == (D,) and v.is_contiguous()), "layer_norm_triton: bad weight/bias"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), "layer_norm_triton: bad out"
    launch_norm_rows("layer_norm", x, out, eps, L=1, shift=bias, scale=weight, one_plus_scale=False, config=config)
    return out
