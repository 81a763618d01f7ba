"""Gated residual update: ``out = res + gate[:, None, :] * y`` (elementwise, memory-bound).

The (B*L, D) rows are cut into 2-D tiles of ``BLOCK_M`` rows x ``BLOCK_D`` columns, with
``BLOCK_D`` a power of two fitted to D (:func:`.settings.column_tiles`): a row is
``D // BLOCK_D`` unmasked tiles, and when BLOCK_D does not divide D the program of the last full
tile also does a power-of-two tail chunk of ``TAIL_D`` columns (D = 1152 -> 1024 + 128, no masked
lane, where plain 1024-wide tiles would leave a second tile 87% masked). Only that tail (when
``TAIL_D > D % BLOCK_D``) and the rows of a last partial row tile are masked. The gate row of a
token is its batch index ``b = row // L``. Used when no norm follows (otherwise
:mod:`.gated_residual_ln_modulate` fuses the next norm too), and as the epilogue of the vendor
GEMM path of ``linear_gated_residual``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from ._common import device_guard, launch_checks, load_chunk_f32, row_alignment, store_chunk


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
    BLOCK_M: tl.constexpr,  # rows per tile (power of two)
    BLOCK_D: tl.constexpr,  # columns per full tile (power of two <= D); grid axis 1 is D // BLOCK_D
    TAIL_D: tl.constexpr,  # tail chunk after the full tiles: power of two >= D % BLOCK_D
    HAS_TAIL: tl.constexpr,  # BLOCK_D does not divide D (else TAIL_D is 1 and unused)
    TAIL_MASKED: tl.constexpr,  # TAIL_D > D % BLOCK_D: the tail's last lanes are masked
    EVEN_M: tl.constexpr,  # n_rows % BLOCK_M == 0: no row is past the end
    ALIGN: tl.constexpr,  # power of two dividing D and the vector strides (_common.row_alignment)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,)
    row_ok = (rows < n_rows)[:, None]  # (BLOCK_M, 1)
    if not EVEN_M:
        rows = tl.minimum(rows, n_rows - 1)  # rows past the end re-read the last row; stores are masked
    b = rows // L
    offs = tl.multiple_of(rows * D, [ALIGN])[:, None]  # (BLOCK_M, 1) row starts of res, y, out
    gate_row = gate_ptr + tl.multiple_of(b * stride_gate_b, [ALIGN])[:, None]
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D), all < D
    rem = tl.multiple_of(D % BLOCK_D, ALIGN)  # columns left after the full tiles
    tcols = (D // BLOCK_D) * BLOCK_D + tl.arange(0, TAIL_D)[None, :]  # (1, TAIL_D)
    tcol_ok = tl.arange(0, TAIL_D)[None, :] < rem  # tcols < D

    res = load_chunk_f32(res_ptr + offs + cols, tcol_ok, False)
    y = load_chunk_f32(y_ptr + offs + cols, tcol_ok, False)
    gate = load_chunk_f32(gate_row + cols, tcol_ok, False)
    store_chunk(out_ptr + offs + cols, (res + gate * y).to(out_ptr.dtype.element_ty), row_ok, tcol_ok,
                not EVEN_M, False)
    if HAS_TAIL:
        if pid_d == tl.num_programs(1) - 1:  # the last full tile's program also does the tail
            res_t = load_chunk_f32(res_ptr + offs + tcols, tcol_ok, TAIL_MASKED)
            y_t = load_chunk_f32(y_ptr + offs + tcols, tcol_ok, TAIL_MASKED)
            gate_t = load_chunk_f32(gate_row + tcols, tcol_ok, TAIL_MASKED)
            store_chunk(out_ptr + offs + tcols, (res_t + gate_t * y_t).to(out_ptr.dtype.element_ty), row_ok,
                        tcol_ok, not EVEN_M, TAIL_MASKED)


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
        config: optional ``{"BLOCK_M", "BLOCK_D", "num_warps"}`` (powers of two); default
            :func:`.settings.row_settings`. ``BLOCK_D`` is clamped to D and the tail chunk
            derived from it (:func:`.settings.column_tiles`).

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
    if config is None:
        cfg = settings.row_settings("gated_residual", D, res.dtype)
    else:
        cfg = settings.fit_row_config("gated_residual", D, config)
    block_m, block_d, tail_d = int(cfg["BLOCK_M"]), int(cfg["BLOCK_D"]), int(cfg["TAIL_D"])
    launch_checks(res)
    grid = (triton.cdiv(n_rows, block_m), D // block_d)
    with device_guard(res):
        _gated_residual_kernel[grid](
            res, gate, y, out,
            n_rows, L, D, gate.stride(0),
            BLOCK_M=block_m, BLOCK_D=block_d, TAIL_D=max(tail_d, 1), HAS_TAIL=tail_d > 0,
            TAIL_MASKED=tail_d > D % block_d, EVEN_M=n_rows % block_m == 0,
            ALIGN=row_alignment(D, gate.stride(0)), num_warps=int(cfg["num_warps"]),
        )
    return out
