"""Helpers shared by the Triton launchers: interpreter detection and launch checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(x_ptr):  # (1,) never launched; its type tells how @triton.jit was set up
    tl.store(x_ptr, 0.0)


def _is_interpreted(kernel: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without an interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


# True when TRITON_INTERPRET=1 was set before these modules were imported: kernels then run on
# CPU tensors through the interpreter (and only there).
INTERPRETED: bool = _is_interpreted(_probe_kernel)


def launch_checks(t: torch.Tensor) -> None:
    """Raise a clear error when a kernel cannot run on ``t``'s device in this process."""
    if t.device.type == "cuda":
        if INTERPRETED:
            raise RuntimeError("mosaic_kernels.triton was imported with TRITON_INTERPRET=1: CUDA tensors cannot run")
        return
    if t.device.type == "cpu" and INTERPRETED:
        return
    raise RuntimeError(
        f"mosaic_kernels Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {t.device}")


@contextlib.contextmanager
def device_guard(t: torch.Tensor) -> Iterator[None]:
    """Make ``t``'s CUDA device current for the launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# @triton.jit helpers of the row kernels (_norm_rows: the LayerNorm ops; gated_residual)
#
# A row of width D is held as a power-of-two main chunk of BLOCK_D columns plus a power-of-two
# tail chunk of TAIL_D columns (.settings.row_blocks): D = 1152 -> 1024 + 128 with no
# masked lane. Only the tail can have masked columns (TAIL_MASKED), and only a program past the
# last full row tile has masked rows (not EVEN_M). Rows past the end are clamped to the last row
# for loads, so loads never need a row mask; stores take the row mask (without it the clamped
# duplicates would store the last row again: the same values, except when ``out`` aliases an
# input, where a duplicate lane may read the row after it was updated).
# ---------------------------------------------------------------------------------------------


@triton.jit
def load_chunk_f32(
    ptrs,  # (BLOCK_M, W) pointers of one chunk
    col_ok,  # (1, W) bool: column < D; read only when MASKED
    MASKED: tl.constexpr,  # the chunk has columns past D (they read 0)
):
    if MASKED:
        v = tl.load(ptrs, mask=col_ok, other=0.0)
    else:
        v = tl.load(ptrs)
    return v.to(tl.float32)


@triton.jit
def store_chunk(
    ptrs,  # (BLOCK_M, W) pointers of one chunk
    value,  # (BLOCK_M, W) values, already in the output dtype
    row_ok,  # (BLOCK_M, 1) bool: row < n_rows; read only when ROW_MASKED
    col_ok,  # (1, W) bool: column < D; read only when COL_MASKED
    ROW_MASKED: tl.constexpr,  # the program has rows past the end
    COL_MASKED: tl.constexpr,  # the chunk has columns past D
):
    if ROW_MASKED:
        if COL_MASKED:
            tl.store(ptrs, value, mask=row_ok & col_ok)
        else:
            tl.store(ptrs, value, mask=row_ok)
    else:
        if COL_MASKED:
            tl.store(ptrs, value, mask=col_ok)
        else:
            tl.store(ptrs, value)


@triton.jit
def layer_norm_chunks(
    x,  # (BLOCK_M, BLOCK_D) fp32 main chunk of the rows
    xt,  # (BLOCK_M, TAIL_D) fp32 tail chunk (0 in masked lanes); ignored without a tail
    tcol_ok,  # (1, TAIL_D) bool: tail column < D; read only when TAIL_MASKED
    D,  # row width: the statistics are over both chunks' D valid columns
    eps,  # variance epsilon
    HAS_TAIL: tl.constexpr,  # the row has a tail chunk
    TAIL_MASKED: tl.constexpr,  # the tail chunk has columns past D
):
    """LayerNorm (no affine) of rows held as main + tail chunks: ``((x - mean) * rstd, (xt - mean) * rstd)``.

    fp32 two-pass statistics from registers (mean, then the variance of the centered values, as
    the Triton layer-norm tutorial), over the D valid columns of both chunks.
    """
    total = tl.sum(x, axis=1)
    if HAS_TAIL:
        total += tl.sum(xt, axis=1)
    mean = total / D  # (BLOCK_M,)
    xc = x - mean[:, None]
    sq = tl.sum(xc * xc, axis=1)
    xtc = xt
    if HAS_TAIL:
        xtc = xt - mean[:, None]
        if TAIL_MASKED:
            xtc = tl.where(tcol_ok, xtc, 0.0)
        sq += tl.sum(xtc * xtc, axis=1)
    rstd = 1.0 / tl.sqrt(sq / D + eps)
    return xc * rstd[:, None], xtc * rstd[:, None]


def row_alignment(D: int, *strides: int) -> int:
    """The ``ALIGN`` hint of the row kernels: the largest power of two <= 16 dividing D and every
    given row stride (a stride of 0, a broadcast vector, divides by anything).

    Row starts ``row * D`` and vector rows ``b * stride`` are then multiples of ALIGN elements,
    which Triton cannot see when D is not a multiple of 16 (it specializes integers only on
    divisibility by 16): D = 72 or 1000 gives ALIGN = 8, so bf16 rows still load as 16-byte
    vectors (the base pointers' alignment Triton specializes by itself).
    """
    align = 16
    for v in (D, *strides):
        v = int(v)
        if v:
            align = min(align, v & -v)
    return align
