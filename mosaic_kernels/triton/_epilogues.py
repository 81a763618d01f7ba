"""The epilogues of the one GEMM kernel (:mod:`._matmul`), one per GEMM op.

They live beside the kernel, not in the op modules: the kernel names them when it is defined,
and the op modules import the kernel's launcher (the other way round would be an import circle).

- ``gelu_tanh``: ``linear_gelu`` (DiT fc1).
- ``gelu_erf``: the gate activation of ``linear_geglu`` (diffusers ``GEGLU``, SDXL feed-forward).
- ``gated_residual_store`` / ``gated_residual_store_tma``: ``linear_gated_residual`` (DiT
  attention proj and fc2), ``out = res + gate[m // L] * acc`` on one column half of the tile;
  with ``GATED=False`` ``out = res + acc`` (``linear_residual``: the un-gated out projection and
  ff2 of an SD/SDXL block with its residual add), the gate never read.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu_tanh(x):
    """``0.5 * x * (1 + tanh(u))`` with ``u = sqrt(2/pi) * (x + 0.044715 x^3)``, as ``x * sigmoid(2u)``.

    The sigmoid is evaluated from ``e = exp(-2|u|)`` in (0, 1], which never overflows, so the
    values at the extremes are torch's ``F.gelu(approximate="tanh")``: -0 for x << 0 (also when
    ``x**3`` overflows), x for x >> 0, +inf at +inf, and NaN at -inf (``-inf * 0``, as
    ``0.5 * x * (1 + tanh(-inf))``) and at NaN. (A clamped ``x / (1 + exp(min(-2u, 80)))`` gave
    -inf at -inf and ``x / 5.5e34`` instead of -0 for |x| > 1e30.)
    """
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))
    sig = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sig


@triton.jit
def gelu_erf(x):
    """Exact GELU ``0.5 * x * (1 + erf(x / sqrt(2)))`` (``F.gelu``'s default): +inf at +inf, NaN
    at -inf (``-inf * 0``) and at NaN, as the formula gives."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gated_residual_store(acc, m0, n0, M, N, L, gate_ptr, stride_gb, res_ptr, out_ptr,
                         BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, OUT_DTYPE: tl.constexpr,
                         GATED: tl.constexpr):
    """``out = res + gate[m // L] * acc`` for the (BLOCK_M, WIDTH) block at row ``m0``, column ``n0``
    (``GATED=False``: ``out = res + acc``, ``gate_ptr`` unused).

    ``res``/``out`` are contiguous (M, N): offsets inside the block are 32-bit from a 64-bit
    block origin (the launcher checks ``BLOCK_M * N < 2**31``).
    """
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, WIDTH)
    mask = (m0 + rows < M)[:, None] & (n0 + cols < N)[None, :]
    base = m0.to(tl.int64) * N + n0  # 64-bit block origin, 32-bit offsets inside the block
    offs = rows[:, None] * N + cols[None, :]
    res = tl.load(res_ptr + base + offs, mask=mask, other=0.0)
    if GATED:
        gate = tl.load(gate_ptr + n0 + ((m0 + rows) // L)[:, None] * stride_gb + cols[None, :], mask=mask,
                       other=0.0)
        out = res.to(tl.float32) + gate.to(tl.float32) * acc
    else:
        out = res.to(tl.float32) + acc
    tl.store(out_ptr + base + offs, out.to(OUT_DTYPE), mask=mask)


@triton.jit
def gated_residual_store_tma(acc, m0, n0, M, N, L, gate_ptr, stride_gb, res_desc, out_desc,
                             BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, OUT_DTYPE: tl.constexpr,
                             GATED: tl.constexpr):
    """:func:`gated_residual_store` with the residual read and the output written through
    tensor descriptors of block ``[BLOCK_M, WIDTH]`` (out-of-bounds rows/columns dropped)."""
    res = res_desc.load([m0, n0]).to(tl.float32)
    if GATED:
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, WIDTH)
        mask = (m0 + rows < M)[:, None] & (n0 + cols < N)[None, :]
        gate = tl.load(gate_ptr + n0 + ((m0 + rows) // L)[:, None] * stride_gb + cols[None, :], mask=mask,
                       other=0.0)
        out = res + gate.to(tl.float32) * acc
    else:
        out = res + acc
    out_desc.store([m0, n0], out.to(OUT_DTYPE))
