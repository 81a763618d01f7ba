"""GEMM with a fused GEGLU epilogue: ``h, g = (x @ weight.T + bias).chunk(2, -1); y = h * gelu(g)``.

diffusers' ``GEGLU`` (the feed-forward of SDXL's transformer blocks) with the exact erf GELU.
``weight`` is (2 * inner, K): rows [0, inner) give the value columns, rows [inner, 2 * inner) the
gate columns. The launcher of the one GEMM kernel (:mod:`._matmul`, ``EPILOGUE="geglu"``): each
program keeps two fp32 accumulators, the value tile and the gate tile of the same output
columns, so the (M, 2 * inner) projection is never written to memory.

References:
    Shazeer, "GLU Variants Improve Transformer" (2020); Triton tutorial 03.
"""

from __future__ import annotations

import torch

from ._matmul import launch_gemm


def linear_geglu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the GEMM kernel with the GEGLU epilogue.

    Args:
        x: (M, K) input (any strides).
        weight: (2 * inner, K) weight (any strides), dtype of ``x``.
        bias: (2 * inner,) contiguous bias, or None.
        out: optional (M, inner) output of ``x.dtype`` with unit last-dim stride.
        config: None -> ``triton.autotune``; a dict -> exactly that tile config (as
            :func:`.linear_gelu.linear_gelu_triton`).

    Returns:
        ``out`` (M, inner).
    """
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "Incompatible dimensions"
    assert weight.shape[0] % 2 == 0, "weight must have 2 * inner rows"
    M, _ = x.shape
    inner = weight.shape[0] // 2
    assert bias is None or (bias.shape == (2 * inner,) and bias.is_contiguous()), "bad bias"
    if out is None:
        out = torch.empty((M, inner), device=x.device, dtype=x.dtype)
    assert out.shape == (M, inner) and out.dtype == x.dtype and (inner <= 1 or out.stride(1) == 1), "bad out"
    launch_gemm("geglu", x, weight, bias, out, config=config)
    return out
