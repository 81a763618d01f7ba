"""Gated residual fused with the next adaLN norm: two outputs from one read of the rows.

``h = res + gate * y`` (stored: the new residual stream), then
``normed = LN(h) * (1 + scale) + shift`` from the fp32 ``h`` still in registers. Replaces three
memory passes (update, LayerNorm, modulate) of an eager DiT block with one. Each program holds
``BLOCK_M`` whole rows as a power-of-two main chunk of ``BLOCK_D`` columns plus a power-of-two
tail of ``TAIL_D`` columns (:func:`mosaic_kernels.configs.row_blocks`: D = 1152 -> 1024 + 128, no
masked lane), int64 row offsets, fp32 math; the LayerNorm is :func:`._common.layer_norm_chunks`,
shared with :mod:`.ln_modulate`. Only the tail (when ``TAIL_D > D - BLOCK_D``) and the rows of a
last partial row tile are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks, layer_norm_chunks, load_chunk_f32, row_alignment, store_chunk


@triton.jit
def _gated_residual_ln_modulate_kernel(
    # Pointers
    res_ptr,  # (B*L, D) residual rows, contiguous
    gate_ptr,  # (B, D) per-sample gate, row stride stride_gate_b
    y_ptr,  # (B*L, D) branch output rows, contiguous
    shift_ptr,  # (B, D) per-sample shift of the next norm, row stride stride_shift_b
    scale_ptr,  # (B, D) per-sample scale of the next norm, row stride stride_scale_b
    h_ptr,  # (B*L, D) output: updated residual rows, dtype of res
    normed_ptr,  # (B*L, D) output: modulated norm of h, dtype of res
    # Sizes and strides
    n_rows,  # B*L
    L,  # tokens per sample
    D,  # row width
    stride_gate_b,
    stride_shift_b,
    stride_scale_b,
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
    b = rows // L
    cols = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    tcols = BLOCK_D + tl.arange(0, TAIL_D)[None, :]  # (1, TAIL_D)
    tcol_ok = tl.arange(0, TAIL_D)[None, :] < tl.multiple_of(D - BLOCK_D, ALIGN)  # tcols < D
    offs = tl.multiple_of(rows * D, [ALIGN])[:, None]  # (BLOCK_M, 1) row starts of res, y, h, normed
    gate_row = gate_ptr + tl.multiple_of(b * stride_gate_b, [ALIGN])[:, None]
    shift_row = shift_ptr + tl.multiple_of(b * stride_shift_b, [ALIGN])[:, None]
    scale_row = scale_ptr + tl.multiple_of(b * stride_scale_b, [ALIGN])[:, None]

    # The tail is loaded first: Triton's layout propagation then keeps the main chunk's coalesced
    # layout for the math and converts only the small tail (see ln_modulate).
    if HAS_TAIL:
        res_t = load_chunk_f32(res_ptr + offs + tcols, tcol_ok, TAIL_MASKED)
        y_t = load_chunk_f32(y_ptr + offs + tcols, tcol_ok, TAIL_MASKED)
        ht = res_t + load_chunk_f32(gate_row + tcols, tcol_ok, TAIL_MASKED) * y_t  # masked lanes are 0
        store_chunk(h_ptr + offs + tcols, ht.to(h_ptr.dtype.element_ty), row_ok, tcol_ok, not EVEN_M, TAIL_MASKED)
    res = load_chunk_f32(res_ptr + offs + cols, tcol_ok, False)
    y = load_chunk_f32(y_ptr + offs + cols, tcol_ok, False)
    h = res + load_chunk_f32(gate_row + cols, tcol_ok, False) * y  # (BLOCK_M, BLOCK_D)
    store_chunk(h_ptr + offs + cols, h.to(h_ptr.dtype.element_ty), row_ok, tcol_ok, not EVEN_M, False)
    if not HAS_TAIL:
        ht = h  # placeholder, unused

    hhat, hhat_t = layer_norm_chunks(h, ht, tcol_ok, D, eps, HAS_TAIL, TAIL_MASKED)
    shift = load_chunk_f32(shift_row + cols, tcol_ok, False)
    scale = load_chunk_f32(scale_row + cols, tcol_ok, False)
    normed = hhat * (1.0 + scale) + shift
    store_chunk(normed_ptr + offs + cols, normed.to(normed_ptr.dtype.element_ty), row_ok, tcol_ok, not EVEN_M, False)
    if HAS_TAIL:
        shift_t = load_chunk_f32(shift_row + tcols, tcol_ok, TAIL_MASKED)
        scale_t = load_chunk_f32(scale_row + tcols, tcol_ok, TAIL_MASKED)
        normed_t = hhat_t * (1.0 + scale_t) + shift_t
        store_chunk(normed_ptr + offs + tcols, normed_t.to(normed_ptr.dtype.element_ty), row_ok, tcol_ok,
                    not EVEN_M, TAIL_MASKED)


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
    """Launch :func:`_gated_residual_ln_modulate_kernel`: (1) check, (2) allocate, (3) launch.

    Args:
        res: (B, L, D) contiguous residual.
        gate: (B, D), unit last-dim stride.
        y: (B, L, D) contiguous branch output.
        shift: (B, D), unit last-dim stride.
        scale: (B, D), unit last-dim stride.
        eps: variance epsilon.
        out: optional ``(h, normed)`` preallocated (B, L, D) contiguous outputs of ``res.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default from
            :func:`mosaic_kernels.configs.get_gated_residual_ln_modulate_config`. The column
            chunks are fixed by D (:func:`mosaic_kernels.configs.row_blocks`): a ``BLOCK_D`` in
            it is ignored.

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
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return h, normed
    cfg = config if config is not None else configs.get_gated_residual_ln_modulate_config(
        (B, L, D), res.dtype, res.device)
    cfg = configs.fit_row_config("gated_residual_ln_modulate", D, cfg)
    block_m, block_d, tail_d = int(cfg["BLOCK_M"]), int(cfg["BLOCK_D"]), int(cfg["TAIL_D"])
    launch_checks(res)
    grid = (triton.cdiv(n_rows, block_m),)
    with device_guard(res):
        _gated_residual_ln_modulate_kernel[grid](
            res, gate, y, shift, scale, h, normed,
            n_rows, L, D, gate.stride(0), shift.stride(0), scale.stride(0), eps,
            BLOCK_M=block_m, BLOCK_D=block_d, TAIL_D=max(tail_d, 1), HAS_TAIL=tail_d > 0,
            TAIL_MASKED=block_d + tail_d > D, EVEN_M=n_rows % block_m == 0,
            ALIGN=row_alignment(D, gate.stride(0), shift.stride(0), scale.stride(0)),
            num_warps=int(cfg["num_warps"]),
        )
    return h, normed
