"""``linear_geglu``: GEMM + bias, then GEGLU ``h * gelu(gate)`` (diffusers ``GEGLU``, SDXL's FeedForward).

Kernel: ``mosaic_kernels/triton/linear_geglu.py`` (the Triton GEMM with a GEGLU epilogue); the
vendor path is cuBLAS through torch, then the GEGLU in the input dtype. Reference
``reference.linear_geglu_ref``; tests ``tests/kernels/test_linear_geglu.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _checks, _dispatch
from ._gemm import GEMM_CHOICE, gemm_bias_inputs, gemm_bias_launch, gemm_flops, gemm_providers, gemm_triton_case
from ._registry import BenchCase, random_maker, register

OP = "linear_geglu"


def _vendor_linear_geglu(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The vendor path on (M, K) rows: cuBLAS GEMM, then the GEGLU (as diffusers runs it)."""
    h, gate = F.linear(x2d, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(gate)


@torch.library.custom_op("mosaic::linear_geglu", mutates_args=())
def _linear_geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    path = _dispatch.dispatched(OP, _dispatch.gemm_path(OP, x, x2d.shape[0], N, K))
    if path == "triton":
        out = _dispatch.triton_package()[0].linear_geglu_triton(x2d, weight, bias)
    elif path == "vendor":
        out = _vendor_linear_geglu(x2d, weight, bias)
    else:
        return ref.linear_geglu_ref(x, weight, bias)
    return out.view(*x.shape[:-1], N // 2)


@_linear_geglu_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h, gate = (x @ weight.T + bias).chunk(2, -1)``; ``y = h * gelu(gate)`` (exact erf GELU). Forward-only.

    On CUDA the default is the vendor path (cuBLAS GEMM, then the GEGLU); the Triton GEMM with
    the GEGLU fused into its epilogue runs where :mod:`mosaic_kernels.configs` measured it
    faster for the shape, or when ``triton`` is pinned.

    Args:
        x: (..., K) contiguous input, float32/float16/bfloat16.
        weight: (2 * inner, K) weight of ``x.dtype``: rows [0, inner) the value, [inner, 2 * inner)
            the gate (diffusers ``GEGLU.proj.weight``).
        bias: (2 * inner,) bias of ``x.dtype``, or None.

    Returns:
        (..., inner) tensor of ``x.dtype``.

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for a 0-d ``x``, mismatched K, an odd number of weight rows, a wrong bias
            shape, or a non-contiguous ``x``.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_linear_inputs(OP, x, weight, bias, None)
    if weight.shape[0] % 2:
        raise ValueError(f"{OP}: weight must have 2 * inner rows (value, then gate), got {weight.shape[0]}")
    _checks.check_same_device(OP, {"x": x, "weight": weight, "bias": bias})
    return torch.ops.mosaic.linear_geglu(x, weight, bias)


def linear_geglu_eager(x, weight, bias):
    """What diffusers' ``GEGLU`` runs: the GEMM, then the GEGLU, in the input dtype."""
    h, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(gate)


register(BenchCase(
    op=OP,
    make_inputs=gemm_bias_inputs,
    # x and the weight read, the (M, N / 2) output written
    bytes_moved=lambda s, e: e * (s[0] * s[2] + s[1] * s[2] + s[1] + s[0] * s[1] // 2),
    flops=gemm_flops,
    reference=ref.linear_geglu_ref,
    providers=lambda: gemm_providers(linear_geglu),
    # SDXL at 1024 px: FeedForward proj of 640 -> 2 x 2560 at 4096 tokens, 1280 -> 2 x 5120 at 1024
    model_shapes=lambda batch: [(batch * 4096, 5120, 640), (batch * 1024, 10240, 1280)],
    tiny_shape=(32, 64, 72),
    eager=linear_geglu_eager,
    choice=GEMM_CHOICE,
    triton=gemm_triton_case("geglu", gemm_bias_launch("linear_geglu_triton")),
))
