"""LayerNorm (no affine) + adaLN modulation in one pass: ``y = LN(x) * (1 + scale) + shift``.

Each program normalizes ``BLOCK_M`` whole rows of ``x``. A row of width D is held in registers as
a power-of-two main chunk of ``BLOCK_D`` columns plus a power-of-two tail chunk of ``TAIL_D``
columns (:func:`mosaic_kernels.configs.row_blocks`: D = 1152 -> 1024 + 128, no masked lane;
D = 2301 -> 2048 + 256), instead of one ``next_power_of_2(D)`` block (2048 lanes for 1152, 44%
masked). Statistics are fp32, two-pass (mean, then variance of the centered values) over both
chunks (:func:`._common.layer_norm_chunks`, shared with the fused gated-residual kernel). The
main chunk is never masked; the tail only when ``TAIL_D > D - BLOCK_D``; rows only in a last
partial row tile (loads clamp to the last row, stores are masked). The modulation of a row is
that of its batch index ``b = row // L``. Rows are indexed in int64 so B*L*D beyond 2**31 does
not overflow.

References:
    Triton tutorial 05 (layer norm); Liger-Kernel ``ops/layer_norm.py``; DiT adaLN-Zero
    (Peebles & Xie, 2023).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks, layer_norm_chunks, load_chunk_f32, row_alignment, store_chunk


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
    BLOCK_M: tl.constexpr,  # rows per program (power of two)
    BLOCK_D: tl.constexpr,  # main chunk: columns [0, BLOCK_D), the largest power of two <= D
    TAIL_D: tl.constexpr,  # tail chunk: columns [BLOCK_D, BLOCK_D + TAIL_D), power of two >= D - BLOCK_D
    HAS_TAIL: tl.constexpr,  # D > BLOCK_D (else TAIL_D is 1 and unused)
    TAIL_MASKED: tl.constexpr,  # BLOCK_D + TAIL_D > D: the tail's last lanes are masked
    EVEN_M: tl.constexpr,  # n_rows % BLOCK_M == 0: no row is past the end
    ALIGN: tl.constexpr,  # power of two dividing D and the vector strides (_common.row_alignment)
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,)
    row_ok = (rows < n_rows)[:, None]  # (BLOCK_M, 1)
    if not EVEN_M:
        rows = tl.minimum(rows, n_rows - 1)  # rows past the end re-read the last row; stores are masked
    b = rows // L  # batch index of each row
    cols = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    tcols = BLOCK_D + tl.arange(0, TAIL_D)[None, :]  # (1, TAIL_D)
    tcol_ok = tl.arange(0, TAIL_D)[None, :] < tl.multiple_of(D - BLOCK_D, ALIGN)  # tcols < D
    offs = tl.multiple_of(rows * D, [ALIGN])[:, None]  # (BLOCK_M, 1) row starts
    x_row = x_ptr + offs
    y_row = y_ptr + offs
    shift_row = shift_ptr + tl.multiple_of(b * stride_shift_b, [ALIGN])[:, None]
    scale_row = scale_ptr + tl.multiple_of(b * stride_scale_b, [ALIGN])[:, None]

    # The tail is loaded first: Triton's layout propagation then keeps the main chunk's coalesced
    # layout for the math and converts only the small tail (loading the main chunk first, it
    # round-trips the whole main chunk through shared memory: 16 KB at BLOCK_M=4, 1024 + 128).
    if HAS_TAIL:
        xt = load_chunk_f32(x_row + tcols, tcol_ok, TAIL_MASKED)  # (BLOCK_M, TAIL_D)
    x = load_chunk_f32(x_row + cols, tcol_ok, False)  # (BLOCK_M, BLOCK_D)
    if not HAS_TAIL:
        xt = x  # placeholder, unused
    xhat, xhat_t = layer_norm_chunks(x, xt, tcol_ok, D, eps, HAS_TAIL, TAIL_MASKED)

    shift = load_chunk_f32(shift_row + cols, tcol_ok, False)
    scale = load_chunk_f32(scale_row + cols, tcol_ok, False)
    y = xhat * (1.0 + scale) + shift
    store_chunk(y_row + cols, y.to(y_ptr.dtype.element_ty), row_ok, tcol_ok, not EVEN_M, False)
    if HAS_TAIL:
        shift_t = load_chunk_f32(shift_row + tcols, tcol_ok, TAIL_MASKED)
        scale_t = load_chunk_f32(scale_row + tcols, tcol_ok, TAIL_MASKED)
        y_t = xhat_t * (1.0 + scale_t) + shift_t
        store_chunk(y_row + tcols, y_t.to(y_ptr.dtype.element_ty), row_ok, tcol_ok, not EVEN_M, TAIL_MASKED)


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
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default from
            :func:`mosaic_kernels.configs.get_ln_modulate_config`. The column chunks are fixed
            by D (:func:`mosaic_kernels.configs.row_blocks`): a ``BLOCK_D`` in it is ignored.

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
    cfg = configs.fit_row_config("ln_modulate", D, cfg)
    block_m, block_d, tail_d = int(cfg["BLOCK_M"]), int(cfg["BLOCK_D"]), int(cfg["TAIL_D"])
    launch_checks(x)
    grid = (triton.cdiv(n_rows, block_m),)
    with device_guard(x):
        _ln_modulate_kernel[grid](
            x, shift, scale, out,
            n_rows, L, D, shift.stride(0), scale.stride(0), eps,
            BLOCK_M=block_m, BLOCK_D=block_d, TAIL_D=max(tail_d, 1), HAS_TAIL=tail_d > 0,
            TAIL_MASKED=block_d + tail_d > D, EVEN_M=n_rows % block_m == 0,
            ALIGN=row_alignment(D, shift.stride(0), scale.stride(0)), num_warps=int(cfg["num_warps"]),
        )
    return out
