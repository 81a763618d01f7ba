"""Gated residual update: ``out = res + gate[:, None, :] * y`` (elementwise, memory-bound).

The (B*L, D) rows are cut into 2-D tiles of ``BLOCK_M`` rows x ``BLOCK_D`` columns; the gate
row of a token is its batch index ``b = row // L``. Used when no norm follows (otherwise
:mod:`.gated_residual_ln_modulate` fuses the next norm too), and as the epilogue of the vendor
GEMM path of ``linear_gated_residual``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks


@triton.jit
def _gated_residual_kernel(
    # Pointers
    res_ptr,  # (B*L, D) residual rows, contiguous
    gate_ptr,  # (B, D) per-sample gate, row stride stride_gate_b, unit last-dim stride
    y_ptr,  # (B*L, D) branch output rows, contiguous
    out_ptr,  # (B*L, D) output rows, contiguous, dtype of res
    # Sizes and strides
    n_rows,  # B*L
    L,  # tokens per sample
    D,  # row width
    stride_gate_b,  # row stride of gate (elements)
    # Meta-parameters
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # columns per tile (power of two)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    b = rows // L
    offs = rows[:, None] * D + cols[None, :]

    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b[:, None] * stride_gate_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (res + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual_triton(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch :func:`_gated_residual_kernel`: (1) check, (2) allocate, (3) launch.

    Args:
        res: (B, L, D) contiguous residual.
        gate: (B, D), unit last-dim stride.
        y: (B, L, D) contiguous branch output.
        out: optional (B, L, D) contiguous output of ``res.dtype`` (may be ``res`` itself).
        config: optional ``{"BLOCK_M", "BLOCK_D", "num_warps"}``; default from
            :func:`mosaic_kernels.configs.get_gated_residual_config`.

    Returns:
        ``out`` (B, L, D).
    """
    B, L, D = res.shape
    assert res.is_contiguous() and y.is_contiguous() and y.shape == res.shape, "gated_residual_triton: bad res/y"
    assert gate.shape == (B, D) and (D == 1 or gate.stride(1) == 1), "gated_residual_triton: bad gate"
    if out is None:
        out = torch.empty_like(res)
    assert out.shape == res.shape and out.dtype == res.dtype and out.is_contiguous(), "gated_residual_triton: bad out"
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return out
    cfg = config if config is not None else configs.get_gated_residual_config((B, L, D), res.dtype, res.device)
    block_m, block_d = int(cfg["BLOCK_M"]), int(cfg["BLOCK_D"])
    launch_checks(res)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(D, block_d))
    with device_guard(res):
        _gated_residual_kernel[grid](
            res, gate, y, out,
            n_rows, L, D, gate.stride(0),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=int(cfg.get("num_warps", 4)),
        )
    return out
