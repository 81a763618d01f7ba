"""``linear_residual``: GEMM + bias, then the residual add ``res + y`` (SD/SDXL out projection, ff2).

Kernel: ``mosaic_kernels/triton/linear_residual.py`` (the Triton GEMM with the residual in its
epilogue); the vendor path is cuBLAS ``addmm`` (bias in its epilogue), then the residual added in
place. Reference ``reference.linear_residual_ref``; tests ``tests/kernels/test_linear_residual.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ._gemm import GEMM_CHOICE, gemm_flops, gemm_providers, gemm_triton_case
from ..op_registry import BenchCase, random_maker, register

OP = "linear_residual"


def _vendor_linear_residual(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            res2d: torch.Tensor) -> torch.Tensor:
    """The vendor path on (M, K) rows: cuBLAS ``addmm`` (bias fused), then ``+= res``. Plain torch."""
    y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    return y.add_(res2d)


@torch.library.custom_op("mosaic::linear_residual", mutates_args=())
def _linear_residual_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        res: torch.Tensor) -> torch.Tensor:
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    path = _dispatch.dispatched(OP, _dispatch.gemm_path(OP, x, x2d.shape[0], N, K))
    if path == "triton":
        return _dispatch.triton_package()[0].linear_residual_triton(x, weight, bias, res)
    if path == "vendor":
        return _vendor_linear_residual(x2d, weight, bias, res.reshape(x2d.shape[0], N)).view(res.shape)
    return ref.linear_residual_ref(x, weight, bias, res)


@_linear_residual_op.register_fake
def _(x, weight, bias, res):
    return torch.empty_like(res)


_autograd.register_reference_backward(_linear_residual_op, ref.linear_residual_ref)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    res: torch.Tensor) -> torch.Tensor:
    """``out = res + (x @ weight.T + bias)``. Differentiable.

    The un-gated residual update of an SD/SDXL transformer block: the out projection (or ``ff2``)
    and the residual add in one pass where no LayerNorm follows (the last block of a
    ``Transformer2DModel``; elsewhere the add is fused with the next norm, ``residual_layer_norm``).
    On CUDA the default is the vendor path (cuBLAS ``addmm``, then the add); the Triton GEMM with
    the residual fused into its epilogue runs where :mod:`mosaic_kernels.configs` measured it
    faster for the shape, or when ``triton`` is pinned.

    Args:
        x: (..., K) contiguous input, float32/float16/bfloat16.
        weight: (N, K) weight of ``x.dtype`` (contiguous in one dim).
        bias: (N,) bias of ``x.dtype``, or None.
        res: (..., N) contiguous residual stream of ``x.dtype`` with ``x``'s leading dims.

    Returns:
        Tensor of ``res``'s shape and dtype. K = 0 gives ``res + bias`` (``res`` without a bias),
        as ``F.linear``.

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for a 0-d ``x``, mismatched K, a wrong bias or ``res`` shape, non-contiguous
            ``x``/``res``, or mismatched devices.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_linear_inputs(OP, x, weight, bias, None)
    _checks.check_tensor(OP, "res", res, x.dim())
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(res.shape) != expected:
        raise ValueError(f"{OP}: res must be (..., N)={expected}, got {tuple(res.shape)}")
    if res.dtype != x.dtype:
        raise TypeError(f"{OP}: res must have the dtype of x ({x.dtype}), got {res.dtype}")
    _checks.check_contiguous(OP, "res", res)
    _checks.check_same_device(OP, {"x": x, "weight": weight, "bias": bias, "res": res})
    return torch.ops.mosaic.linear_residual(x, weight, bias, res)


def linear_residual_eager(x, weight, bias, res):
    """What diffusers runs: the GEMM, then the residual add, in the input dtype."""
    return F.linear(x, weight, bias) + res


def _inputs(shape, dtype, device, generator):
    M, N, K = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(1, M, K), rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1), rnd(1, M, N)


def _bytes(shape, e):
    M, N, K = shape
    return e * (M * K + N * K + N + 2 * M * N)  # x, weight, bias and res read, out written


def _launch_triton(shape, dtype, config, alloc):
    M, N, K = shape
    _dispatch.triton_package()[0].linear_residual_triton(alloc(1, M, K), alloc(N, K), alloc(N), alloc(1, M, N),
                                                         config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=_bytes,
    flops=gemm_flops,
    reference=ref.linear_residual_ref,
    providers=lambda: gemm_providers(linear_residual),
    # SDXL at 1024 px: ff2 of the last block of each Transformer2DModel (K = 4C) and the attention
    # out projections (K = C) at 64x64 tokens of 640 and 32x32 tokens of 1280
    model_shapes=lambda batch: [(batch * 4096, 640, 2560), (batch * 4096, 640, 640),
                                (batch * 1024, 1280, 5120), (batch * 1024, 1280, 1280)],
    tiny_shape=(32, 72, 64),
    eager=linear_residual_eager,
    choice=GEMM_CHOICE,
    triton=gemm_triton_case("residual", _launch_triton),
))
