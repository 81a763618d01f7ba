"""Gated residual fused with the next adaLN norm: two outputs from one read of the rows.

``h = res + gate * y`` (stored: the new residual stream), then
``normed = LN(h) * (1 + scale) + shift`` from the fp32 ``h`` still in registers. Replaces three
memory passes (update, LayerNorm, modulate) of an eager DiT block with one. The launcher of
:func:`._norm_rows._norm_rows_kernel` with ``HAS_GATE`` (the row kernel shared with
``ln_modulate`` and ``layer_norm``).
"""

from __future__ import annotations

import torch

from ._norm_rows import launch_norm_rows


def gated_residual_ln_modulate_triton(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) check, (2) allocate, (3) launch the shared LayerNorm row kernel with the gated residual.

    Args:
        res: (B, L, D) contiguous residual.
        gate: (B, D), unit last-dim stride.
        y: (B, L, D) contiguous branch output.
        shift: (B, D), unit last-dim stride.
        scale: (B, D), unit last-dim stride.
        eps: variance epsilon.
        out: optional ``(h, normed)`` preallocated (B, L, D) contiguous outputs of ``res.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default
            :func:`.settings.row_settings`. The column chunks are fixed by D
            (:func:`.settings.row_blocks`): a ``BLOCK_D`` in it is ignored.

    Returns:
        ``(h, normed)``.
    """
    B, L, D = res.shape
    assert res.is_contiguous() and y.is_contiguous() and y.shape == res.shape, "bad res/y"
    for v in (gate, shift, scale):
        assert v.shape == (B, D) and (D == 1 or v.stride(1) == 1), "bad (B, D) vector"
    h, normed = out if out is not None else (torch.empty_like(res), torch.empty_like(res))
    for o in (h, normed):
        assert o.shape == res.shape and o.dtype == res.dtype and o.is_contiguous(), "bad out"
    launch_norm_rows("gated_residual_ln_modulate", res, normed, eps, L=L, shift=shift, scale=scale,
                     one_plus_scale=True, gate=gate, y=y, h=h, config=config)
    return h, normed
