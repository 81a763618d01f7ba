"""adaLN-single LayerNorm + modulation in one pass: ``y = LN(x) * (1 + scale + scale_t) + shift + shift_t``.

PixArt's blocks modulate with the sum of the sample's chunk of the model's one ``adaln_single``
output and the block's learned ``scale_shift_table`` row; the launcher of
:func:`._norm_rows._norm_rows_kernel` (shared with ``ln_modulate``) with ``HAS_TABLE`` adds the
row inside the kernel, so no (B, D) sum is formed in memory.

References:
    Triton tutorial 05 (layer norm); PixArt-alpha adaLN-single (Chen et al., 2023).
"""

from __future__ import annotations

import torch

from ._norm_rows import launch_norm_rows


def ln_modulate_table_triton(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    shift_table: torch.Tensor,
    scale_table: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the shared LayerNorm row kernel with the table rows.

    Args:
        x: (B, L, D) contiguous input.
        shift, scale: (B, D), unit last-dim stride (chunks of one adaLN output: row-strided views).
        shift_table, scale_table: (D,) contiguous table rows.
        eps: variance epsilon.
        out: optional (B, L, D) contiguous output of ``x.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default
            :func:`.settings.row_settings`.

    Returns:
        ``out`` (B, L, D).
    """
    B, L, D = x.shape
    assert x.is_contiguous() and shift.shape == (B, D) and scale.shape == (B, D), "ln_modulate_table_triton: bad inputs"
    assert D == 1 or (shift.stride(1) == 1 and scale.stride(1) == 1), "ln_modulate_table_triton: strided shift/scale"
    for t in (shift_table, scale_table):
        assert t.shape == (D,) and t.is_contiguous(), "ln_modulate_table_triton: bad table row"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), "ln_modulate_table_triton: bad out"
    launch_norm_rows("ln_modulate_table", x, out, eps, L=L, shift=shift, scale=scale, one_plus_scale=True,
                     tables=(None, shift_table, scale_table), config=config)
    return out
