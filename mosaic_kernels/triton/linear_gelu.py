"""GEMM with a fused bias + tanh-GELU epilogue: ``y = gelu_tanh(x @ weight.T + bias)`` (DiT fc1).

Tiled GEMM (see :mod:`._matmul`), grouped-M tile order, fp32 accumulation, bf16/fp16/fp32
operands. The epilogue adds the bias and applies the tanh-GELU on the fp32 accumulator before
the single store. On H100 this plain kernel loses to cuBLASLt's bias+GELU epilogue
(research/anchors.md), so ``mosaic_kernels.ops`` uses it only where the config table says
``"backend": "triton"`` or when the ``triton`` backend is pinned.

References:
    Triton tutorial 03 (matrix multiplication); Hendrycks & Gimpel, GELU (tanh approximation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks
from ._matmul import (
    gelu_tanh,
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
def _linear_gelu_kernel(
    # Pointers
    x_ptr,  # (M, K) input rows
    w_ptr,  # (N, K) weight
    bias_ptr,  # (N,) bias (unused when HAS_BIAS is False)
    out_ptr,  # (M, N) output, row stride stride_om, dtype of x
    # Matrix dimensions
    M, N, K,
    # Strides (elements)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om,
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
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = gelu_tanh(acc)
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_gelu_tma_kernel(
    # Tensor descriptors (host-built; TMA on Hopper)
    x_desc,  # over x (M, K), block [BLOCK_M, BLOCK_K]
    w_desc,  # over weight (N, K), block [BLOCK_N, BLOCK_K]
    out_desc,  # over out (M, N), block [BLOCK_M, BLOCK_N]
    # Pointers
    bias_ptr,  # (N,) bias (unused when HAS_BIAS is False)
    # Matrix dimensions
    M, N, K,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    OUT_DTYPE: tl.constexpr,  # tl dtype of out
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile_tma(x_desc, w_desc, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT, INPUT_PRECISION)
    if HAS_BIAS:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], gelu_tanh(acc).to(OUT_DTYPE))  # OOB rows/cols dropped


def linear_gelu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch :func:`_linear_gelu_kernel`: (1) check, (2) allocate, (3) launch.

    Args:
        x: (M, K) input (any strides).
        weight: (N, K) weight (any strides), dtype of ``x``.
        bias: (N,) contiguous bias, or None.
        out: optional (M, N) output of ``x.dtype`` with unit last-dim stride.
        config: optional GEMM config (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``,
            ``num_warps``, ``num_stages``, and ``TMA``: use the tensor-descriptor kernel where
            :func:`._matmul.tma_ok` allows); default from
            :func:`mosaic_kernels.configs.get_linear_gelu_config`.

    Returns:
        ``out`` (M, N). K = 0 gives ``gelu_tanh(bias)`` (or 0) per row, as ``F.linear`` does.
    """
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "Incompatible dimensions"
    M, K = x.shape
    N = weight.shape[0]
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bad bias"
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    assert out.shape == (M, N) and out.dtype == x.dtype and (N <= 1 or out.stride(1) == 1), "bad out"
    if M == 0 or N == 0:
        return out
    cfg = config if config is not None else configs.get_linear_gelu_config((M, N, K), x.dtype, x.device)
    launch_checks(x)
    meta = gemm_meta(cfg, x.dtype)
    if cfg.get("TMA", False) and K > 0 and tma_ok(x, weight, out):  # K = 0: no tile to describe
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        with device_guard(x):
            _linear_gelu_tma_kernel[gemm_grid(M, N, cfg)](
                make_descriptor(x, [bm, bk]), make_descriptor(weight, [bn, bk]), make_descriptor(out, [bm, bn]),
                bias if bias is not None else x,
                M, N, K,
                HAS_BIAS=bias is not None, OUT_DTYPE=tl_dtype(out.dtype), **meta,
            )
        return out
    with device_guard(x):
        _linear_gelu_kernel[gemm_grid(M, N, cfg)](
            x, weight, bias if bias is not None else x, out,
            M, N, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, **meta,
        )
    return out
