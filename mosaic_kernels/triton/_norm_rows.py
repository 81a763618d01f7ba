"""The one LayerNorm row kernel of ``ln_modulate``, ``gated_residual_ln_modulate``, ``layer_norm``,
``residual_layer_norm`` and the adaLN-single ``ln_modulate_table`` / ``gated_residual_ln_modulate_table``.

``HAS_BRANCH`` first forms (and stores) the residual update ``h = x + gate * y`` (``GATED``) or
``h = x + y``; the rows are then
normalized (LayerNorm without affine, fp32 two-pass statistics: :func:`._common.layer_norm_chunks`)
and scaled and shifted: ``LN * (1 + scale[b]) + shift[b]`` per sample (adaLN modulation,
``ONE_PLUS_SCALE``) or ``LN * weight + bias`` per column (affine LayerNorm: vectors of row
stride 0); ``HAS_TABLE`` adds a (D,) row to each per-sample vector first (PixArt's adaLN-single:
``scale_shift_table`` row + the sample's chunk of the one ``adaln_single`` output). The CUDA side has one
templated kernel for the first three cases.

Each program holds ``BLOCK_M`` whole rows as a power-of-two main chunk of ``BLOCK_D`` columns plus
a power-of-two tail of ``TAIL_D`` columns (:func:`.settings.row_blocks`: D = 1152 -> 1024 + 128,
no masked lane; 2301 -> 2048 + 256). The main chunk is never masked, the tail only when
``TAIL_D > D - BLOCK_D``, rows only in a last partial row tile (loads clamp to the last row,
stores are masked). Rows are indexed in int64 so B*L*D beyond 2**31 does not overflow.

References:
    Triton tutorial 05 (layer norm); Liger-Kernel ``ops/layer_norm.py``; DiT adaLN-Zero
    (Peebles & Xie, 2023).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from ._common import device_guard, launch_checks, layer_norm_chunks, load_chunk_f32, row_alignment, store_chunk


@triton.jit
def _scale_shift_store(
    xhat,  # (BLOCK_M, W) fp32 normalized chunk
    out_ptrs,  # (BLOCK_M, W) output pointers
    shift_ptrs,  # (BLOCK_M, W) shift pointers; read only when HAS_SHIFT
    scale_ptrs,  # (BLOCK_M, W) scale pointers; read only when HAS_SCALE
    shift_t_ptrs,  # (1, W) shift table row pointers; read only when HAS_TABLE
    scale_t_ptrs,  # (1, W) scale table row pointers; read only when HAS_TABLE
    row_ok,  # (BLOCK_M, 1) bool: row < n_rows
    col_ok,  # (1, W) bool: column < D
    ROW_MASKED: tl.constexpr, COL_MASKED: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, ONE_PLUS_SCALE: tl.constexpr, HAS_TABLE: tl.constexpr,
):
    """``out = xhat * (ONE_PLUS_SCALE + scale [+ scale_t]) + shift [+ shift_t]`` for one chunk
    (missing terms left out)."""
    y = xhat
    if HAS_SCALE:
        scale = load_chunk_f32(scale_ptrs, col_ok, COL_MASKED)
        if HAS_TABLE:
            scale = scale + load_chunk_f32(scale_t_ptrs, col_ok, COL_MASKED)
        if ONE_PLUS_SCALE:
            scale = 1.0 + scale
        y = y * scale
    if HAS_SHIFT:
        shift = load_chunk_f32(shift_ptrs, col_ok, COL_MASKED)
        if HAS_TABLE:
            shift = shift + load_chunk_f32(shift_t_ptrs, col_ok, COL_MASKED)
        y = y + shift
    store_chunk(out_ptrs, y.to(out_ptrs.dtype.element_ty), row_ok, col_ok, ROW_MASKED, COL_MASKED)


@triton.jit
def _norm_rows_kernel(
    # Pointers (unused ones are any valid pointer)
    x_ptr,  # (B*L, D) rows, contiguous (HAS_BRANCH: the residual)
    gate_ptr,  # (B, D) per-sample gate, row stride stride_gate_b; read only when GATED
    y_ptr,  # (B*L, D) branch output rows, contiguous; read only when HAS_BRANCH
    shift_ptr,  # (B, D) per-sample shift, or (D,) bias with row stride 0; read only when HAS_SHIFT
    scale_ptr,  # (B, D) per-sample scale, or (D,) weight with row stride 0; read only when HAS_SCALE
    gate_t_ptr,  # (D,) per-channel gate row added to the gate; read only when HAS_TABLE and GATED
    shift_t_ptr,  # (D,) per-channel shift row added to the shift; read only when HAS_TABLE
    scale_t_ptr,  # (D,) per-channel scale row added to the scale; read only when HAS_TABLE
    h_ptr,  # (B*L, D) output h = x + [gate *] y, dtype of x; written only when HAS_BRANCH
    out_ptr,  # (B*L, D) output: scaled and shifted LayerNorm of the rows (of h), dtype of x
    # Sizes and strides
    n_rows,  # B*L
    L,  # tokens per sample: the vectors' row of a row is row // L
    D,  # row width
    stride_gate_b, stride_shift_b, stride_scale_b,  # row strides of the vectors (elements)
    eps,  # variance epsilon
    # Meta-parameters
    HAS_BRANCH: tl.constexpr,  # form h = x + [gate *] y first (and store it)
    GATED: tl.constexpr,  # the branch is gated (adaLN-Zero) or added as is (SD/SDXL blocks)
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ONE_PLUS_SCALE: tl.constexpr,  # multiply by 1 + scale (adaLN) instead of scale (weight)
    HAS_TABLE: tl.constexpr,  # add the (D,) table rows to gate, shift and scale (adaLN-single)
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
    b = rows // L
    cols = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    tcols = BLOCK_D + tl.arange(0, TAIL_D)[None, :]  # (1, TAIL_D)
    tcol_ok = tl.arange(0, TAIL_D)[None, :] < tl.multiple_of(D - BLOCK_D, ALIGN)  # tcols < D
    offs = tl.multiple_of(rows * D, [ALIGN])[:, None]  # (BLOCK_M, 1) row starts of x, y, h, out
    gate_row = gate_ptr + tl.multiple_of(b * stride_gate_b, [ALIGN])[:, None]
    shift_row = shift_ptr + tl.multiple_of(b * stride_shift_b, [ALIGN])[:, None]
    scale_row = scale_ptr + tl.multiple_of(b * stride_scale_b, [ALIGN])[:, None]
    masked_rows = not EVEN_M

    # The tail is loaded first: Triton's layout propagation then keeps the main chunk's coalesced
    # layout for the math and converts only the small tail (loading the main chunk first, it
    # round-trips the whole main chunk through shared memory: 16 KB at BLOCK_M=4, 1024 + 128).
    if HAS_TAIL:
        xt = load_chunk_f32(x_ptr + offs + tcols, tcol_ok, TAIL_MASKED)  # (BLOCK_M, TAIL_D)
        if HAS_BRANCH:
            y_t = load_chunk_f32(y_ptr + offs + tcols, tcol_ok, TAIL_MASKED)
            if GATED:
                g_t = load_chunk_f32(gate_row + tcols, tcol_ok, TAIL_MASKED)
                if HAS_TABLE:
                    g_t = g_t + load_chunk_f32(gate_t_ptr + tcols, tcol_ok, TAIL_MASKED)
                y_t = g_t * y_t
            xt = xt + y_t  # masked lanes are 0
            store_chunk(h_ptr + offs + tcols, xt.to(h_ptr.dtype.element_ty), row_ok, tcol_ok, masked_rows,
                        TAIL_MASKED)
    x = load_chunk_f32(x_ptr + offs + cols, tcol_ok, False)  # (BLOCK_M, BLOCK_D)
    if HAS_BRANCH:
        y = load_chunk_f32(y_ptr + offs + cols, tcol_ok, False)
        if GATED:
            g = load_chunk_f32(gate_row + cols, tcol_ok, False)
            if HAS_TABLE:
                g = g + load_chunk_f32(gate_t_ptr + cols, tcol_ok, False)
            y = g * y
        x = x + y
        store_chunk(h_ptr + offs + cols, x.to(h_ptr.dtype.element_ty), row_ok, tcol_ok, masked_rows, False)
    if not HAS_TAIL:
        xt = x  # placeholder, unused

    xhat, xhat_t = layer_norm_chunks(x, xt, tcol_ok, D, eps, HAS_TAIL, TAIL_MASKED)
    _scale_shift_store(xhat, out_ptr + offs + cols, shift_row + cols, scale_row + cols, shift_t_ptr + cols,
                       scale_t_ptr + cols, row_ok, tcol_ok, masked_rows, False, HAS_SHIFT, HAS_SCALE, ONE_PLUS_SCALE,
                       HAS_TABLE)
    if HAS_TAIL:
        _scale_shift_store(xhat_t, out_ptr + offs + tcols, shift_row + tcols, scale_row + tcols, shift_t_ptr + tcols,
                           scale_t_ptr + tcols, row_ok, tcol_ok, masked_rows, TAIL_MASKED, HAS_SHIFT, HAS_SCALE,
                           ONE_PLUS_SCALE, HAS_TABLE)


def launch_norm_rows(
    op: str,
    x: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    *,
    L: int,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    one_plus_scale: bool,
    gate: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    tables: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> None:
    """Launch :func:`_norm_rows_kernel` over the (n_rows, D) rows of the contiguous ``x``.

    Vectors are indexed ``b = row // L`` with their row stride (0 for a per-column weight/bias);
    their last-dim stride must be 1. ``y``/``h`` go together (``HAS_BRANCH``); ``gate`` needs them.
    ``tables``: ``(gate_table or None, shift_table, scale_table)``, contiguous (D,) rows added to
    the vectors (``HAS_TABLE``: PixArt's adaLN-single ``scale_shift_table``).
    ``config``: None -> :func:`.settings.row_settings`; a dict -> exactly its ``BLOCK_M`` and
    ``num_warps`` (columns are fixed by D: :func:`.settings.fit_row_config`).
    """
    D = x.shape[-1]
    n_rows = x.numel() // D if D else 0
    if n_rows == 0 or D == 0:
        return
    cfg = settings.row_settings(op, D, x.dtype) if config is None else settings.fit_row_config(op, D, config)
    block_m, block_d, tail_d = int(cfg["BLOCK_M"]), int(cfg["BLOCK_D"]), int(cfg["TAIL_D"])
    launch_checks(x)
    # Row strides of the vectors: 0 for a (D,) weight/bias (the same row for every token).
    stride = [v.stride(0) if v is not None and v.dim() == 2 else 0 for v in (gate, shift, scale)]
    grid = (triton.cdiv(n_rows, block_m),)
    with device_guard(x):
        _norm_rows_kernel[grid](
            x, gate if gate is not None else x, y if y is not None else x,
            shift if shift is not None else x, scale if scale is not None else x,
            *(t if t is not None else x for t in (tables or (None, None, None))),
            h if h is not None else out, out,
            n_rows, L, D, *stride, eps,
            HAS_BRANCH=y is not None, GATED=gate is not None,
            HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, ONE_PLUS_SCALE=one_plus_scale,
            HAS_TABLE=tables is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, TAIL_D=max(tail_d, 1), HAS_TAIL=tail_d > 0,
            TAIL_MASKED=block_d + tail_d > D, EVEN_M=n_rows % block_m == 0,
            ALIGN=row_alignment(D, *stride), num_warps=int(cfg["num_warps"]),
        )
