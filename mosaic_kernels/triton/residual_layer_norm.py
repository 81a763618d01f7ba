"""Residual add fused with the next affine LayerNorm: ``h = res + y``, ``normed = LN(h) * weight + bias``.

One read of the rows gives both outputs (the new residual stream and the next sub-block's
input), where an eager SD/SDXL transformer block runs an add, then a LayerNorm that reads the
stream again. The launcher of :func:`._norm_rows._norm_rows_kernel` with an ungated branch and the
affine vectors of row stride 0 (the row kernel shared with ``layer_norm`` and the adaLN ops).
"""

from __future__ import annotations

import torch

from ._norm_rows import launch_norm_rows


def residual_layer_norm_triton(
    res: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) check, (2) allocate, (3) launch the shared LayerNorm row kernel with the residual add.

    Args:
        res: (..., D) contiguous residual stream.
        y: branch output of ``res``'s shape, dtype and layout.
        weight, bias: (D,) contiguous, or None.
        eps: variance epsilon.
        out: optional ``(h, normed)`` preallocated contiguous outputs of ``res``'s shape and dtype.
        config: optional ``{"BLOCK_M", "num_warps"}``; default :func:`.settings.row_settings`.

    Returns:
        ``(h, normed)``.
    """
    assert res.is_contiguous() and y.is_contiguous() and y.shape == res.shape, "bad res/y"
    D = res.shape[-1]
    for v in (weight, bias):
        assert v is None or (v.shape == (D,) and v.is_contiguous()), "bad weight/bias"
    h, normed = out if out is not None else (torch.empty_like(res), torch.empty_like(res))
    for o in (h, normed):
        assert o.shape == res.shape and o.dtype == res.dtype and o.is_contiguous(), "bad out"
    launch_norm_rows("residual_layer_norm", res, normed, eps, L=1, shift=bias, scale=weight, one_plus_scale=False,
                     y=y, h=h, config=config)
    return h, normed
