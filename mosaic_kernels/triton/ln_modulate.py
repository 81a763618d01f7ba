"""LayerNorm (no affine) + adaLN modulation in one pass: ``y = LN(x) * (1 + scale) + shift``.

Each program normalizes ``BLOCK_M`` whole rows of ``x`` (``BLOCK_D`` = next power of two of D
columns, masked), with fp32 statistics (two-pass mean/variance over registers, as the Triton
layer-norm tutorial), then applies the per-sample modulation of the row's batch index
``b = row // L``. Rows are indexed in int64 so B*L*D beyond 2**31 does not overflow.

References:
    Triton tutorial 05 (layer norm); Liger-Kernel ``ops/layer_norm.py``; DiT adaLN-Zero
    (Peebles & Xie, 2023).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks


@triton.jit
def _ln_modulate_kernel(
    # Pointers
    x_ptr,  # (B*L, D) input rows, contiguous
    shift_ptr,  # (B, D) per-sample shift, row stride stride_shift_b
    scale_ptr,  # (B, D) per-sample scale, row stride stride_scale_b
    y_ptr,  # (B*L, D) output rows, contiguous, dtype of x
    # Sizes and strides
    n_rows,  # B*L
    L,  # tokens per sample: batch index of a row is row // L
    D,  # row width
    stride_shift_b,  # row stride of shift (elements); its last-dim stride is 1
    stride_scale_b,  # row stride of scale
    eps,  # variance epsilon
    # Meta-parameters
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_mask = rows < n_rows
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    b = rows // L

    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D  # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)

    shift = tl.load(shift_ptr + b[:, None] * stride_shift_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b[:, None] * stride_scale_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def ln_modulate_triton(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch :func:`_ln_modulate_kernel`: (1) check, (2) allocate, (3) launch.

    Args:
        x: (B, L, D) contiguous input.
        shift: (B, D), unit last-dim stride.
        scale: (B, D), unit last-dim stride.
        eps: variance epsilon.
        out: optional (B, L, D) contiguous output of ``x.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}``; default from
            :func:`mosaic_kernels.configs.get_ln_modulate_config`.

    Returns:
        ``out`` (B, L, D).
    """
    B, L, D = x.shape
    assert x.is_contiguous() and shift.shape == (B, D) and scale.shape == (B, D), "ln_modulate_triton: bad inputs"
    assert D == 1 or (shift.stride(1) == 1 and scale.stride(1) == 1), "ln_modulate_triton: strided shift/scale"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), "ln_modulate_triton: bad out"
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return out
    cfg = config if config is not None else configs.get_ln_modulate_config((B, L, D), x.dtype, x.device)
    block_m = int(cfg["BLOCK_M"])
    block_d = triton.next_power_of_2(D)
    launch_checks(x)
    grid = (triton.cdiv(n_rows, block_m),)
    with device_guard(x):
        _ln_modulate_kernel[grid](
            x, shift, scale, out,
            n_rows, L, D, shift.stride(0), scale.stride(0), eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=int(cfg.get("num_warps", 4)),
        )
    return out
