"""GEMM with a fused bias + tanh-GELU epilogue: ``y = gelu_tanh(x @ weight.T + bias)`` (DiT fc1).

The launcher of the one GEMM kernel (:mod:`._matmul`, ``EPILOGUE="gelu_tanh"``): tiled, grouped-M
order, fp32 accumulation, bf16/fp16/fp32 operands; the epilogue adds the bias and applies the
tanh-GELU on the fp32 accumulator before the single store. cuBLASLt has a bias+GELU epilogue
too, so :mod:`mosaic_kernels.ops` decides per backend which one runs.

References:
    Triton tutorial 03 (matrix multiplication); Hendrycks & Gimpel, GELU (tanh approximation).
"""

from __future__ import annotations

import torch

from ._matmul import launch_gemm


def linear_gelu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the GEMM kernel with the tanh-GELU epilogue.

    Args:
        x: (M, K) input (any strides).
        weight: (N, K) weight (any strides), dtype of ``x``.
        bias: (N,) contiguous bias, or None.
        out: optional (M, N) output of ``x.dtype`` with unit last-dim stride.
        config: None -> ``triton.autotune`` (:data:`.settings.GEMM_CONFIGS`); a dict -> exactly
            that tile config (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, ``num_warps``,
            ``num_stages``; ``"tma": True`` for tensor descriptors where
            :func:`._matmul.tma_ok` allows).

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
    launch_gemm("gelu_tanh", x, weight, bias, out, config=config)
    return out
