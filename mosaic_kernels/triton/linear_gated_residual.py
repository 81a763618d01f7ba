"""GEMM with a fused gate/residual epilogue: ``out = res + gate[b] * (x @ weight.T + bias)``.

The attention output projection and fc2 of a DiT block end in adaLN-Zero's gated residual
update; cuBLASLt epilogues cannot express a per-sample gate, so this kernel fuses it: each
output row ``m`` (token ``m`` of the flattened (B*L) rows) reads its gate row ``b = m // L``
and its residual row, and the fp32 accumulator is stored once. Tiled GEMM in
:mod:`._matmul`, grouped-M order, fp32 accumulation.

The epilogue runs on two column halves of the tile, one after the other (the accumulator is
split with reshape/permute/split, as in Triton's persistent-matmul tutorial): with full-width
gate and residual tiles live next to the accumulator, tiles of 128x128 and wider spilled
(up to ~880 B of local memory per thread, ``benchmarks/compile_check.py``); with halves none do.
Offsets inside a block are 32-bit from a 64-bit block origin, which the launcher checks.

References:
    Triton tutorial 03 (matrix multiplication); DiT adaLN-Zero (Peebles & Xie, 2023).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks
from ._matmul import (
    gemm_grid,
    gemm_meta,
    grouped_tile_ids,
    make_descriptor,
    matmul_tile,
    matmul_tile_tma,
    tl_dtype,
    tma_ok,
)


@triton.jit
def _linear_gated_residual_kernel(
    # Pointers
    x_ptr,  # (M, K) input rows, M = B*L
    w_ptr,  # (N, K) weight
    bias_ptr,  # (N,) bias (unused when HAS_BIAS is False)
    gate_ptr,  # (B, N) per-sample gate, row stride stride_gb, unit last-dim stride
    res_ptr,  # (M, N) residual rows, contiguous
    out_ptr,  # (M, N) output rows, contiguous, dtype of res
    # Matrix dimensions
    M, N, K,
    L,  # tokens per sample: the gate row of output row m is m // L
    # Strides (elements)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_gb,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, offs_m, offs_n = matmul_tile(
        x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, pid_m, pid_n,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # Two column halves, one after the other: gate and residual tiles of half the width are live
    # next to the accumulator, not full ones (full ones spill at 128x128 and wider tiles).
    acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
    acc0, acc1 = tl.split(acc)
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    _gated_residual_store(acc0, m0, n0, M, N, L, gate_ptr, stride_gb, res_ptr, out_ptr, BLOCK_M, BLOCK_N // 2)
    _gated_residual_store(acc1, m0, n0 + BLOCK_N // 2, M, N, L, gate_ptr, stride_gb, res_ptr, out_ptr,
                          BLOCK_M, BLOCK_N // 2)


@triton.jit
def _gated_residual_store(acc, m0, n0, M, N, L, gate_ptr, stride_gb, res_ptr, out_ptr,
                          BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """``out = res + gate[m // L] * acc`` for the (BLOCK_M, WIDTH) block at row ``m0``, column ``n0``."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, WIDTH)
    mask = (m0 + rows < M)[:, None] & (n0 + cols < N)[None, :]
    gate = tl.load(gate_ptr + n0 + ((m0 + rows) // L)[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0)
    base = m0.to(tl.int64) * N + n0  # 64-bit block origin, 32-bit offsets inside the block
    offs = rows[:, None] * N + cols[None, :]
    res = tl.load(res_ptr + base + offs, mask=mask, other=0.0)
    out = res.to(tl.float32) + gate.to(tl.float32) * acc
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_gated_residual_tma_kernel(
    # Tensor descriptors (host-built; TMA on Hopper)
    x_desc,  # over x (M, K), block [BLOCK_M, BLOCK_K]
    w_desc,  # over weight (N, K), block [BLOCK_N, BLOCK_K]
    res_desc,  # over res (M, N), block [BLOCK_M, BLOCK_N]
    out_desc,  # over out (M, N), block [BLOCK_M, BLOCK_N]
    # Pointers
    bias_ptr,  # (N,) bias (unused when HAS_BIAS is False)
    gate_ptr,  # (B, N) per-sample gate, row stride stride_gb
    # Matrix dimensions
    M, N, K,
    L,  # tokens per sample: the gate row of output row m is m // L
    stride_gb,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    OUT_DTYPE: tl.constexpr,  # tl dtype of out
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile_tma(x_desc, w_desc, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT, INPUT_PRECISION)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # Column halves one after the other, as in the pointer kernel (res/out blocks are half wide).
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    _gated_residual_store_tma(acc0, m0, n0, M, N, L, gate_ptr, stride_gb, res_desc, out_desc,
                              BLOCK_M, BLOCK_N // 2, OUT_DTYPE)
    _gated_residual_store_tma(acc1, m0, n0 + BLOCK_N // 2, M, N, L, gate_ptr, stride_gb, res_desc, out_desc,
                              BLOCK_M, BLOCK_N // 2, OUT_DTYPE)


@triton.jit
def _gated_residual_store_tma(acc, m0, n0, M, N, L, gate_ptr, stride_gb, res_desc, out_desc,
                              BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """:func:`_gated_residual_store` with the residual read and the output written through TMA."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, WIDTH)
    mask = (m0 + rows < M)[:, None] & (n0 + cols < N)[None, :]
    gate = tl.load(gate_ptr + n0 + ((m0 + rows) // L)[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0)
    res = res_desc.load([m0, n0]).to(tl.float32)
    out_desc.store([m0, n0], (res + gate.to(tl.float32) * acc).to(OUT_DTYPE))  # OOB rows/cols dropped


def linear_gated_residual_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    res: torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch :func:`_linear_gated_residual_kernel`: (1) check, (2) allocate, (3) launch.

    Args:
        x: (B, L, K) input with unit stride in K... any strides of its (B*L, K) view.
        weight: (N, K) weight (any strides), dtype of ``x``.
        bias: (N,) contiguous bias, or None.
        gate: (B, N), unit last-dim stride.
        res: (B, L, N) contiguous residual.
        out: optional (B, L, N) contiguous output of ``res.dtype`` (may be ``res`` itself:
            every element is read before it is written, by the same program).
        config: optional GEMM config (``TMA`` selects the tensor-descriptor kernel where
            :func:`._matmul.tma_ok` allows); default from
            :func:`mosaic_kernels.configs.get_linear_gated_residual_config`.

    Returns:
        ``out`` (B, L, N).
    """
    assert x.dim() == 3 and weight.dim() == 2 and x.shape[2] == weight.shape[1], "Incompatible dimensions"
    B, L, K = x.shape
    N = weight.shape[0]
    assert res.shape == (B, L, N) and res.is_contiguous(), "bad res"
    assert gate.shape == (B, N) and (N <= 1 or gate.stride(1) == 1), "bad gate"
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bad bias"
    x2d = x.reshape(B * L, K)
    if out is None:
        out = torch.empty_like(res)
    assert out.shape == res.shape and out.dtype == res.dtype and out.is_contiguous(), "bad out"
    M = B * L
    if M == 0 or N == 0:
        return out
    cfg = config if config is not None else configs.get_linear_gated_residual_config((M, N, K), x.dtype, x.device)
    launch_checks(x)
    meta = gemm_meta(cfg, x.dtype)
    # The epilogue's in-block offsets (rows * N, gate rows * stride) are 32-bit.
    assert meta["BLOCK_M"] * N < 2**31 and B * max(gate.stride(0), 1) < 2**31, "too large for 32-bit block offsets"
    res2d, out2d = res.view(M, N), out.view(M, N)
    if cfg.get("TMA", False) and tma_ok(x2d, weight, res2d, out2d):
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        with device_guard(x):
            _linear_gated_residual_tma_kernel[gemm_grid(M, N, cfg)](
                make_descriptor(x2d, [bm, bk]), make_descriptor(weight, [bn, bk]),
                make_descriptor(res2d, [bm, bn // 2]), make_descriptor(out2d, [bm, bn // 2]),  # epilogue halves
                bias if bias is not None else x2d, gate,
                M, N, K, L, gate.stride(0),
                HAS_BIAS=bias is not None, OUT_DTYPE=tl_dtype(out.dtype), **meta,
            )
        return out
    with device_guard(x):
        _linear_gated_residual_kernel[gemm_grid(M, N, cfg)](
            x2d, weight, bias if bias is not None else x2d, gate, res, out,
            M, N, K, L,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), gate.stride(0),
            HAS_BIAS=bias is not None, **meta,
        )
    return out
