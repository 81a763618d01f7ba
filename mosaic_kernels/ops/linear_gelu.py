"""``linear_gelu``: GEMM + bias + tanh-GELU (a DiT block's fc1).

Kernel: ``mosaic_kernels/triton/linear_gelu.py`` (the Triton GEMM with a GELU epilogue); the
vendor path is cuBLASLt's bias + GELU epilogue through torch. Reference
``reference.linear_gelu_ref``; tests ``tests/kernels/test_linear_gelu.py``,
``tests/kernels/test_vendor_path.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ._gemm import DIT_MLP_WIDTHS, DIT_WIDTH, GEMM_CHOICE, gemm_bias_inputs, gemm_bias_launch, gemm_flops, gemm_providers, gemm_triton_case
from ..op_registry import BenchCase, register

OP = "linear_gelu"


def _addmm_gelu_tanh(bias: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x2d @ weight.T + bias)`` as one cuBLASLt GEMM with its bias + GELU epilogue.

    CUDA only: on CUDA the GELU of ``torch._addmm_activation`` is the tanh approximation
    (cuBLASLt's epilogue, and its non-Lt fallback calls ``gelu(..., "tanh")``); on CPU it is the
    erf GELU. Called with K > 0 only.
    """
    return torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True)


def _vendor_linear_gelu(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The vendor path on (M, K) rows: cuBLAS(Lt) through torch, (M, N) out.

    Plain torch apart from :func:`_addmm_gelu_tanh` (the CUDA-only fused epilogue), so the
    tests run it on CPU with ``torch._addmm_activation`` replaced by a tanh-GELU spy.
    """
    if x2d.shape[1] == 0:
        # No product to compute: F.linear's K = 0 result (the bias, or zeros), then the GELU,
        # without relying on how cuBLAS(Lt) or torch's empty-input shortcut treats the epilogue.
        acc = x2d.new_zeros(x2d.shape[0], weight.shape[0])
        return F.gelu(acc if bias is None else acc + bias, approximate="tanh")
    if bias is not None:
        return _addmm_gelu_tanh(bias, x2d, weight)
    return F.gelu(x2d @ weight.t(), approximate="tanh")


@torch.library.custom_op("mosaic::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    path = _dispatch.dispatched(OP, _dispatch.gemm_path(OP, x, x2d.shape[0], N, K))
    if path == "triton":
        out = _dispatch.triton_package()[0].linear_gelu_triton(x2d, weight, bias)
    elif path == "vendor":
        out = _vendor_linear_gelu(x2d, weight, bias)
    else:
        return ref.linear_gelu_ref(x, weight, bias)
    return out.view(*x.shape[:-1], N)


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_autograd.register_reference_backward(_linear_gelu_op, ref.linear_gelu_ref)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = gelu_tanh(x @ weight.T + bias)``. Differentiable.

    On CUDA the default is the vendor path (cuBLASLt GEMM with its bias + GELU epilogue); the
    Triton GEMM with a fused epilogue runs where :mod:`mosaic_kernels.configs` measured it
    faster for the shape, or when ``triton`` is pinned.

    Args:
        x: (..., K) contiguous input, float32/float16/bfloat16.
        weight: (N, K) weight of ``x.dtype`` (as ``nn.Linear.weight``).
        bias: (N,) bias of ``x.dtype``, or None.

    Returns:
        (..., N) tensor of ``x.dtype``. K = 0 gives ``gelu_tanh(bias)`` in every row (0 without
        a bias), as ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``. Non-finite values
        follow torch's tanh GELU on every backend: a pre-activation of +inf gives +inf, -inf
        and NaN give NaN (``inf * 0`` in the product is NaN).

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for a 0-d ``x``, mismatched K, a wrong bias shape, or a non-contiguous ``x``.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_linear_inputs(OP, x, weight, bias, None)
    _checks.check_same_device(OP, {"x": x, "weight": weight, "bias": bias})
    return torch.ops.mosaic.linear_gelu(x, weight, bias)


def linear_gelu_eager(x, weight, bias):
    """Plain torch in the input dtype: the GEMM, then the tanh GELU."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


register(BenchCase(
    op=OP,
    make_inputs=gemm_bias_inputs,
    bytes_moved=lambda shape, e: e * (shape[0] * shape[2] + shape[1] * shape[2] + shape[1] + shape[0] * shape[1]),
    flops=gemm_flops,
    reference=ref.linear_gelu_ref,
    providers=lambda: gemm_providers(linear_gelu),
    model_shapes=lambda batch: [(batch * 256, n, DIT_WIDTH) for n in DIT_MLP_WIDTHS],  # DiT-XL/2 fc1
    tiny_shape=(32, 64, 72),
    eager=linear_gelu_eager,
    choice=GEMM_CHOICE,
    triton=gemm_triton_case("gelu_tanh", gemm_bias_launch("linear_gelu_triton")),
))
