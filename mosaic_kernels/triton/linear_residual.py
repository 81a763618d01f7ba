"""GEMM with a fused residual epilogue: ``out = res + (x @ weight.T + bias)``.

The out projections and ``ff2`` of an SD/SDXL transformer block end in a plain residual add
(no gate: ``norm_type="layer_norm"``). Where no LayerNorm follows (the last block of a
``Transformer2DModel``) the add is fused here: each output tile reads its residual tile and the
fp32 accumulator is stored once. The launcher of the one GEMM kernel (:mod:`._matmul`,
``EPILOGUE="residual"``: the gated-residual column-half stores without the gate). Offsets inside
a block are 32-bit from a 64-bit block origin, which the launcher checks.

References:
    Triton tutorial 03 (matrix multiplication).
"""

from __future__ import annotations

import math

import torch

from ._matmul import launch_gemm
from .settings import GEMM_CONFIGS


def linear_residual_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    res: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the GEMM kernel with the residual epilogue.

    Args:
        x: (..., K) input, any strides of its (M, K) view (M = the product of the leading dims).
        weight: (N, K) weight (any strides), dtype of ``x``.
        bias: (N,) contiguous bias, or None.
        res: (..., N) contiguous residual, ``x``'s leading dims.
        out: optional output of ``res``'s shape and dtype, contiguous (may be ``res`` itself:
            every element is read before it is written, by the same program; while autotuning
            the kernel runs several times, so then the result goes through a temporary).
        config: None -> ``triton.autotune``; a dict -> exactly that tile config (as
            :func:`.linear_gelu.linear_gelu_triton`).

    Returns:
        ``out``, of ``res``'s shape.
    """
    assert x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1], "Incompatible dimensions"
    N, K = weight.shape
    M = math.prod(x.shape[:-1])
    assert tuple(res.shape) == (*x.shape[:-1], N) and res.is_contiguous(), "bad res"
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bad bias"
    if out is None:
        out = torch.empty_like(res)
    assert out.shape == res.shape and out.dtype == res.dtype and out.is_contiguous(), "bad out"
    if M == 0 or N == 0:
        return out
    block_m = int(config["BLOCK_M"]) if config is not None else max(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)
    assert block_m * N < 2**31, "too large for 32-bit block offsets"  # the epilogue's rows * N
    target = out
    if config is None and out.untyped_storage().data_ptr() == res.untyped_storage().data_ptr():
        target = torch.empty_like(res)  # autotuning reruns the kernel: it must not read its own output
    launch_gemm("residual", x.reshape(M, K), weight, bias, target.view(M, N), res=res.view(M, N), config=config)
    if target is not out:
        out.copy_(target)
    return out
