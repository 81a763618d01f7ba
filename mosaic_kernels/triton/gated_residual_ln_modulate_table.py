"""adaLN-single gated residual fused with the next norm: two outputs from one read of the rows.

``h = res + (gate + gate_t) * y`` (stored), then ``normed = LN(h) * (1 + scale + scale_t) + shift
+ shift_t`` from the fp32 ``h`` still in registers: the end of one PixArt block and the first norm
of the next (or the final layer's norm), each vector the sample's chunk of the ``adaln_single``
output plus a per-channel ``scale_shift_table`` row. The launcher of
:func:`._norm_rows._norm_rows_kernel` with ``HAS_BRANCH``, ``GATED`` and ``HAS_TABLE``.
"""

from __future__ import annotations

import torch

from ._norm_rows import launch_norm_rows


def gated_residual_ln_modulate_table_triton(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate_table: torch.Tensor,
    shift_table: torch.Tensor,
    scale_table: torch.Tensor,
    eps: float = 1e-6,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) check, (2) allocate, (3) launch the shared LayerNorm row kernel with the gated residual
    and the table rows.

    Args:
        res: (B, L, D) contiguous residual.
        gate, shift, scale: (B, D), unit last-dim stride.
        y: (B, L, D) contiguous branch output.
        gate_table, shift_table, scale_table: (D,) contiguous table rows.
        eps: variance epsilon.
        out: optional ``(h, normed)`` preallocated (B, L, D) contiguous outputs of ``res.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}``; default :func:`.settings.row_settings`.

    Returns:
        ``(h, normed)``.
    """
    B, L, D = res.shape
    assert res.is_contiguous() and y.is_contiguous() and y.shape == res.shape, "bad res/y"
    for v in (gate, shift, scale):
        assert v.shape == (B, D) and (D == 1 or v.stride(1) == 1), "bad (B, D) vector"
    for t in (gate_table, shift_table, scale_table):
        assert t.shape == (D,) and t.is_contiguous(), "bad table row"
    h, normed = out if out is not None else (torch.empty_like(res), torch.empty_like(res))
    for o in (h, normed):
        assert o.shape == res.shape and o.dtype == res.dtype and o.is_contiguous(), "bad out"
    launch_norm_rows("gated_residual_ln_modulate_table", res, normed, eps, L=L, shift=shift, scale=scale,
                     one_plus_scale=True, gate=gate, y=y, h=h, tables=(gate_table, shift_table, scale_table),
                     config=config)
    return h, normed
