"""Per-head RMSNorm of q or k, then rotary embeddings, in one pass: ``rms_norm_rope``.

Each row is one (b, s, h) head vector of width D (head_dim), read from a (B, S, H, D) tensor
of any strides but a unit last one (a head view of a fused qkv projection output) and written
to another (a slice of a joint ``[text | image]`` buffer). Per row, in fp32:

1. ``y = x * rsqrt(mean(x^2) + eps) * weight``, rounded as the diffusers module the op replaces
   rounds (``reference.rms_norm_rope_ref``): without RoPE as diffusers' ``RMSNorm`` (SD3.5: to a
   half weight's dtype before and after the product, ``DOUBLE_ROUND``), with RoPE as
   ``torch.nn.RMSNorm`` (Flux: once, to the output dtype);
2. with ``HAS_ROPE``, Flux's ``apply_rotary_emb`` (``use_real_unbind_dim=-1``):
   ``out = y * cos[s] + rot(y) * sin[s]`` with ``rot(y)[2i] = -y[2i+1]``, ``rot(y)[2i+1] = y[2i]``.
   The rotation pairs neighbouring lanes of the loaded chunk: reshaped to (rows, W/2, 2) and
   split, so the row is still loaded and stored as contiguous vectors.

A row is held as a power-of-two main chunk plus a power-of-two tail (:func:`.settings.row_blocks`:
D = 72 -> 64 + 8, 24 -> 16 + 8): an even D splits into even chunks, so no pair straddles two
chunks. Rows are indexed in int64 (b, s, h from the flat row), so large strided tensors do not
overflow.

References:
    Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019); Su et al., "RoFormer" (2021);
    diffusers ``RMSNorm`` and ``apply_rotary_emb``; Triton tutorial 05 (layer norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from ._common import device_guard, launch_checks, load_chunk_f32, row_alignment, store_chunk

OP = "rms_norm_rope"


@triton.jit
def _weight_rope_store(
    y,  # (BLOCK_M, W) fp32 chunk of x * rstd
    out_ptrs,  # (BLOCK_M, W) output pointers
    w_ptrs,  # (1, W) weight pointers; read only when HAS_WEIGHT
    cos_ptrs,  # (BLOCK_M, W) pointers into each row's cos row; read only when HAS_ROPE
    sin_ptrs,  # (BLOCK_M, W) pointers into each row's sin row; read only when HAS_ROPE
    row_ok,  # (BLOCK_M, 1) bool: row < n_rows
    col_ok,  # (1, W) bool: column < D
    ROW_MASKED: tl.constexpr, COL_MASKED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, DOUBLE_ROUND: tl.constexpr, HAS_ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, W: tl.constexpr,
):
    """Weight, RoPE and store of one chunk, with the roundings of the diffusers modules."""
    if HAS_WEIGHT:
        w = load_chunk_f32(w_ptrs, col_ok, COL_MASKED)
        if DOUBLE_ROUND:
            w_ty = w_ptrs.dtype.element_ty
            y = (y.to(w_ty).to(tl.float32) * w).to(w_ty).to(tl.float32)
        else:
            y = y * w
    if HAS_ROPE:
        y = y.to(out_ptrs.dtype.element_ty).to(tl.float32)  # the norm's output, as apply_rotary_emb gets it
        c = load_chunk_f32(cos_ptrs, col_ok, COL_MASKED)
        s = load_chunk_f32(sin_ptrs, col_ok, COL_MASKED)
        even, odd = tl.split(tl.reshape(y, (BLOCK_M, W // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (BLOCK_M, W))
        y = y * c + rotated * s
    store_chunk(out_ptrs, y.to(out_ptrs.dtype.element_ty), row_ok, col_ok, ROW_MASKED, COL_MASKED)


@triton.jit
def _rms_norm_rope_kernel(
    # Pointers (unused ones are any valid pointer)
    x_ptr,  # (B, S, H, D) input, strides (stride_xb, stride_xs, stride_xh, 1)
    w_ptr,  # (D,) contiguous weight; read only when HAS_WEIGHT
    cos_ptr,  # (S, D) fp32 cosines, row stride stride_cs; read only when HAS_ROPE
    sin_ptr,  # (S, D) fp32 sines, row stride stride_ss; read only when HAS_ROPE
    out_ptr,  # (B, S, H, D) output of x's dtype, strides (stride_ob, stride_os, stride_oh, 1)
    # Sizes and strides (elements)
    n_rows,  # B * S * H
    S, H, D,
    stride_xb, stride_xs, stride_xh,
    stride_ob, stride_os, stride_oh,
    stride_cs, stride_ss,
    eps,  # RMSNorm epsilon
    # Meta-parameters
    HAS_WEIGHT: tl.constexpr,
    DOUBLE_ROUND: tl.constexpr,  # fp16/bf16 weight, no RoPE: diffusers' RMSNorm rounds around the product
    HAS_ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program (power of two)
    BLOCK_D: tl.constexpr,  # main chunk: columns [0, BLOCK_D), the largest power of two <= D
    TAIL_D: tl.constexpr,  # tail chunk: columns [BLOCK_D, BLOCK_D + TAIL_D), power of two >= D - BLOCK_D
    HAS_TAIL: tl.constexpr,  # D > BLOCK_D (else TAIL_D is 2 and unused)
    TAIL_MASKED: tl.constexpr,  # BLOCK_D + TAIL_D > D: the tail's last lanes are masked
    EVEN_M: tl.constexpr,  # n_rows % BLOCK_M == 0: no row is past the end
    ALIGN: tl.constexpr,  # power of two dividing D and every row stride (_common.row_alignment)
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,) flat (b, s, h) rows
    row_ok = (rows < n_rows)[:, None]
    if not EVEN_M:
        rows = tl.minimum(rows, n_rows - 1)  # rows past the end re-read the last row; stores are masked
    h = rows % H
    s = (rows // H) % S
    b = rows // H // S
    x_row = x_ptr + tl.multiple_of(b * stride_xb + s * stride_xs + h * stride_xh, [ALIGN])[:, None]
    out_row = out_ptr + tl.multiple_of(b * stride_ob + s * stride_os + h * stride_oh, [ALIGN])[:, None]
    cos_row = cos_ptr + tl.multiple_of(s * stride_cs, [ALIGN])[:, None]
    sin_row = sin_ptr + tl.multiple_of(s * stride_ss, [ALIGN])[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    tcols = BLOCK_D + tl.arange(0, TAIL_D)[None, :]  # (1, TAIL_D)
    tcol_ok = tl.arange(0, TAIL_D)[None, :] < tl.multiple_of(D - BLOCK_D, ALIGN)  # tcols < D
    masked_rows = not EVEN_M

    # Tail first, as in _norm_rows: the main chunk then keeps its coalesced layout.
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_TAIL:
        xt = load_chunk_f32(x_row + tcols, tcol_ok, TAIL_MASKED)  # (BLOCK_M, TAIL_D), 0 past D
        sq += tl.sum(xt * xt, axis=1)
    x = load_chunk_f32(x_row + cols, tcol_ok, False)  # (BLOCK_M, BLOCK_D)
    sq += tl.sum(x * x, axis=1)
    rstd = (1.0 / tl.sqrt(sq / D + eps))[:, None]

    _weight_rope_store(x * rstd, out_row + cols, w_ptr + cols, cos_row + cols, sin_row + cols, row_ok, tcol_ok,
                       masked_rows, False, HAS_WEIGHT, DOUBLE_ROUND, HAS_ROPE, BLOCK_M, BLOCK_D)
    if HAS_TAIL:
        _weight_rope_store(xt * rstd, out_row + tcols, w_ptr + tcols, cos_row + tcols, sin_row + tcols, row_ok,
                           tcol_ok, masked_rows, TAIL_MASKED, HAS_WEIGHT, DOUBLE_ROUND, HAS_ROPE, BLOCK_M, TAIL_D)


def _row_strides(t: torch.Tensor) -> list[int]:
    """Strides of the leading dims, 0 where a dim has size 1 (its stride never multiplies a non-zero index)."""
    return [st if n > 1 else 0 for n, st in zip(t.shape[:-1], t.stride()[:-1])]


def rms_norm_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch :func:`_rms_norm_rope_kernel` over the B*S*H rows.

    Args:
        x: (B, S, H, D), unit last-dim stride, other strides arbitrary.
        weight: (D,) contiguous, or None.
        cos: (S, D) float32 with unit last-dim stride, or None (then ``sin`` is None too).
        sin: (S, D) float32, or None.
        eps: RMSNorm epsilon.
        out: optional (B, S, H, D) destination of ``x.dtype`` with unit last-dim stride.
        config: optional ``{"BLOCK_M", "num_warps"}`` (BLOCK_M a power of two); default
            :func:`.settings.row_settings`. The column chunks are fixed by D.

    Returns:
        ``out`` (B, S, H, D); a new contiguous tensor when ``out`` is None.
    """
    B, S, H, D = x.shape
    rope = cos is not None
    assert (sin is not None) == rope and (not rope or D % 2 == 0), "rms_norm_rope_triton: bad cos/sin"
    assert D <= 1 or x.stride(3) == 1, "rms_norm_rope_triton: x needs a unit last-dim stride"
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == x.dtype and (D <= 1 or out.stride(3) == 1), \
        "rms_norm_rope_triton: bad out"
    n_rows = B * S * H
    if n_rows == 0 or D == 0:
        return out
    cfg = settings.row_settings(OP, D, x.dtype) if config is None else settings.fit_row_config(OP, D, config)
    block_m, block_d, tail_d = int(cfg["BLOCK_M"]), int(cfg["BLOCK_D"]), int(cfg["TAIL_D"])
    launch_checks(x)
    rope_strides = [cos.stride(0) if S > 1 else 0, sin.stride(0) if S > 1 else 0] if rope else [0, 0]
    strides = [*_row_strides(x), *_row_strides(out), *rope_strides]
    with device_guard(x):
        _rms_norm_rope_kernel[(triton.cdiv(n_rows, block_m),)](
            x, weight if weight is not None else x, cos if rope else x, sin if rope else x, out,
            n_rows, S, H, D, *strides, eps,
            HAS_WEIGHT=weight is not None,
            DOUBLE_ROUND=not rope and weight is not None and weight.dtype in (torch.float16, torch.bfloat16),
            HAS_ROPE=rope,
            BLOCK_M=block_m, BLOCK_D=block_d, TAIL_D=max(tail_d, 2), HAS_TAIL=tail_d > 0,
            TAIL_MASKED=block_d + tail_d > D, EVEN_M=n_rows % block_m == 0,
            ALIGN=row_alignment(D, *strides), num_warps=int(cfg["num_warps"]),
        )
    return out
