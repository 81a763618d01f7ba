"""LayerNorm (no affine) + adaLN modulation in one pass: ``y = LN(x) * (1 + scale) + shift``.

The launcher of :func:`._norm_rows._norm_rows_kernel` (the row kernel shared with
``gated_residual_ln_modulate`` and ``layer_norm``) with per-sample shift/scale: the modulation of
a row is that of its batch index ``b = row // L``.

References:
    Triton tutorial 05 (layer norm); DiT adaLN-Zero (Peebles & Xie, 2023).
"""

from __future__ import annotations

import torch

from ._norm_rows import launch_norm_rows


def ln_modulate_triton(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the shared LayerNorm row kernel.

    Args:
        x: (B, L, D) contiguous input.
        shift: (B, D), unit last-dim stride.
        scale: (B, D), unit last-dim stride.
        eps: variance epsilon.
        out: optional (B, L, D) contiguous output of ``x.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default
            :func:`.settings.row_settings`. The column chunks are fixed by D
            (:func:`.settings.row_blocks`): a ``BLOCK_D`` in it is ignored.

    Returns:
        ``out`` (B, L, D).
    """
    B, L, D = x.shape
    assert x.is_contiguous() and shift.shape == (B, D) and scale.shape == (B, D), "ln_modulate_triton: bad inputs"
    assert D == 1 or (shift.stride(1) == 1 and scale.stride(1) == 1), "ln_modulate_triton: strided shift/scale"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), "ln_modulate_triton: bad out"
    launch_norm_rows("ln_modulate", x, out, eps, L=L, shift=shift, scale=scale, one_plus_scale=True, config=config)
    return out
