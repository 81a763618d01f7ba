"""GEMM with a fused gate/residual epilogue: ``out = res + gate[b] * (x @ weight.T + bias)``.

The attention output projection and fc2 of a DiT block end in adaLN-Zero's gated residual
update; cuBLASLt epilogues cannot express a per-sample gate, so this kernel fuses it: each
output row ``m`` (token ``m`` of the flattened (B*L) rows) reads its gate row ``b = m // L``
and its residual row, and the fp32 accumulator is stored once. The launcher of the one GEMM
kernel (:mod:`._matmul`, ``EPILOGUE="gated_residual"``: the epilogue runs on two column halves
of the tile so that 128x128 and wider tiles do not spill). Offsets inside a block are 32-bit
from a 64-bit block origin, which the launcher checks.

References:
    Triton tutorial 03 (matrix multiplication); DiT adaLN-Zero (Peebles & Xie, 2023).
"""

from __future__ import annotations

import torch

from ._matmul import launch_gemm
from .settings import GEMM_CONFIGS


def linear_gated_residual_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    res: torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) allocate, (3) launch the GEMM kernel with the gated-residual epilogue.

    Args:
        x: (B, L, K) input, any strides of its (B*L, K) view.
        weight: (N, K) weight (any strides), dtype of ``x``.
        bias: (N,) contiguous bias, or None.
        gate: (B, N), unit last-dim stride.
        res: (B, L, N) contiguous residual.
        out: optional (B, L, N) contiguous output of ``res.dtype`` (may be ``res`` itself:
            every element is read before it is written, by the same program; while autotuning
            the kernel runs several times, so then the result goes through a temporary).
        config: None -> ``triton.autotune``; a dict -> exactly that tile config (as
            :func:`.linear_gelu.linear_gelu_triton`).

    Returns:
        ``out`` (B, L, N).
    """
    assert x.dim() == 3 and weight.dim() == 2 and x.shape[2] == weight.shape[1], "Incompatible dimensions"
    B, L, K = x.shape
    N = weight.shape[0]
    assert res.shape == (B, L, N) and res.is_contiguous(), "bad res"
    assert gate.shape == (B, N) and (N <= 1 or gate.stride(1) == 1), "bad gate"
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bad bias"
    if out is None:
        out = torch.empty_like(res)
    assert out.shape == res.shape and out.dtype == res.dtype and out.is_contiguous(), "bad out"
    M = B * L
    if M == 0 or N == 0:
        return out
    block_m = int(config["BLOCK_M"]) if config is not None else max(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)
    # The epilogue's in-block offsets (rows * N, gate rows * stride) are 32-bit.
    assert block_m * N < 2**31 and B * max(gate.stride(0), 1) < 2**31, "too large for 32-bit block offsets"
    target = out
    if config is None and out.untyped_storage().data_ptr() == res.untyped_storage().data_ptr():
        target = torch.empty_like(res)  # autotuning reruns the kernel: it must not read its own output
    launch_gemm("gated_residual", x.reshape(M, K), weight, bias, target.view(M, N), gate=gate, res=res.view(M, N),
                L=L, config=config)
    if target is not out:
        out.copy_(target)
    return out
