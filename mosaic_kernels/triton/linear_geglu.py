"""GEMM with a fused GEGLU epilogue: ``h, g = (x @ weight.T + bias).chunk(2, -1); y = h * gelu(g)``.

diffusers' ``GEGLU`` (the feed-forward of SDXL's transformer blocks) with the exact erf GELU.
``weight`` is (2 * inner, K): rows [0, inner) give the value columns, rows [inner, 2 * inner) the
gate columns; or ``weight`` holds the value rows alone and ``gate_weight`` the gate rows (two
views, e.g. row ranges of one shared storage: no copy). The launcher of the one GEMM kernel
(:mod:`._matmul`, ``EPILOGUE="geglu"``): each program keeps two fp32 accumulators, the value
tile and the gate tile of the same output columns, so the (M, 2 * inner) projection is never
written to memory.

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
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the GEMM kernel with the GEGLU epilogue.

    Args:
        x: (M, K) input (any strides).
        weight: (2 * inner, K) weight (any strides), dtype of ``x``; with ``gate_weight``, the
            (inner, K) value rows alone.
        bias: (2 * inner,) contiguous bias, or None; with ``gate_weight``, the (inner,) value bias.
        out: optional (M, inner) output of ``x.dtype`` with unit last-dim stride.
        gate_weight: optional (inner, K) gate rows (any strides: e.g. a row range of a larger
            storage), read in place of ``weight``'s second half.
        gate_bias: (inner,) contiguous gate bias: given exactly when ``bias`` is.
        config: None -> ``triton.autotune``; a dict -> exactly that tile config (as
            :func:`.linear_gelu.linear_gelu_triton`).

    Returns:
        ``out`` (M, inner).
    """
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], "Incompatible dimensions"
    M, _ = x.shape
    if gate_weight is None:
        assert gate_bias is None, "gate_bias without gate_weight"
        assert weight.shape[0] % 2 == 0, "weight must have 2 * inner rows"
        inner = weight.shape[0] // 2
        assert bias is None or (bias.shape == (2 * inner,) and bias.is_contiguous()), "bad bias"
    else:
        inner = weight.shape[0]
        assert gate_weight.shape == weight.shape and gate_weight.dtype == weight.dtype, "bad gate_weight"
        for b in (bias, gate_bias):
            assert b is None or (b.shape == (inner,) and b.is_contiguous()), "bad bias"
        assert (bias is None) == (gate_bias is None), "bias and gate_bias: both or neither"
    if out is None:
        out = torch.empty((M, inner), device=x.device, dtype=x.dtype)
    assert out.shape == (M, inner) and out.dtype == x.dtype and (inner <= 1 or out.stride(1) == 1), "bad out"
    launch_gemm("geglu", x, weight, bias, out, gate_weight=gate_weight, gate_bias=gate_bias, config=config)
    return out
